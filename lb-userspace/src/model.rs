//! The Kubernetes semantics of the agent: [`desired`] turns the whole store (Services,
//! EndpointSlices) and this node's identity into the [`DesiredState`] its datapath must hold, the
//! way kube-proxy reads the same objects, and lists the objects it refused. It is pure: no I/O,
//! no clock, the same store always gives the same state.
//!
//! # Semantics
//! - **Which Services.** Type ClusterIP (the default), NodePort and LoadBalancer are programmed.
//!   Headless Services (`clusterIP: None`), `ExternalName` Services and objects labelled
//!   `service.kubernetes.io/headless` are not. Objects labelled
//!   `service.kubernetes.io/service-proxy-name` belong to another proxy unless the label equals
//!   [`ModelOptions::service_proxy_name`]. As in kube-proxy, both label rules filter
//!   EndpointSlices as well as Services. Only IPv4 is programmed: the first IPv4 address of
//!   `spec.clusterIPs` (or `spec.clusterIP`) is the cluster IP; an IPv6-only Service is skipped.
//! - **Frontends.** Each TCP/UDP service port gives `clusterIP:port` (`ClusterIp`); for NodePort
//!   and LoadBalancer Services with a `nodePort`, `nodeAddress:nodePort` for every address of
//!   this node (NodePort); for LoadBalancer Services, `ingressIP:port` for every
//!   `status.loadBalancer.ingress[].ip` whose `ipMode` is absent or `VIP` (`Proxy` means the load
//!   balancer itself proxies, so kube-proxy leaves the address alone); for every IPv4
//!   `spec.externalIPs` entry, `externalIP:port` (`ExternalIp`). Every frontend exists in both
//!   scopes: External (arrived on a NIC) and Internal (sent by a pod of this node).
//! - **Backends per scope** (kube-proxy's cluster/local endpoint sets):
//!   `ClusterIp`, both scopes: all endpoints, or only this node's with
//!   `internalTrafficPolicy: Local`; kube-proxy applies the internal policy to every packet
//!   for the cluster IP, whatever its source. `snat_remote` is set (kube-proxy masquerades
//!   off-cluster sources of cluster-IP traffic).
//!   `NodePort`, `LoadBalancer` and `ExternalIp`, External scope: all endpoints with SNAT to remote
//!   ones (`externalTrafficPolicy: Cluster`), or only this node's endpoints and the client's
//!   address kept (`Local`: `snat_remote` false). Internal scope: all endpoints with
//!   `snat_remote`, whatever the policies: kube-proxy short-circuits pod traffic to external
//!   addresses to the cluster-wide endpoints.
//!   A frontend with no backend is still programmed: the datapath drops its traffic.
//! - **Endpoints.** EndpointSlices join their Service by namespace and the
//!   `kubernetes.io/service-name` label. Only `addressType: IPv4` slices are read: IPv6 slices
//!   are counted in [`Desired::ipv6_slices_ignored`], FQDN slices ignored. A service port takes
//!   from each slice the port entry with the same name and protocol (unnamed = ""), and that
//!   entry's `port` is the backend port: `targetPort` (number or name) is not consulted, the
//!   EndpointSlice controller has already resolved it per pod. The first address of an endpoint
//!   is its address (the API says consumers use only that one). An endpoint is ready when
//!   `conditions.ready` is true or absent; a set (all endpoints, or this node's) uses its ready
//!   endpoints, or if it has none, its serving-and-terminating ones (KEP-1669).
//!   `publishNotReadyAddresses` makes every endpoint ready. An address:port listed in several
//!   slices counts once (a ready copy wins). A backend is `local` when its endpoint's
//!   `nodeName` is this node. Backends are sorted.
//! - **Refused input.** A Service or EndpointSlice with a field Kubernetes validation would
//!   reject (port 0 or above 65535, nodePort 0 or above 65535 — any nodePort in 1..=65535 is
//!   accepted, the 30000-32767 default range is the API server's business — an address that does
//!   not parse, two ports with the same (port, protocol) or name, an unknown type or traffic
//!   policy, more than [`ModelOptions::max_endpoints_per_slice`] endpoints) is skipped whole with
//!   one warning and an [`Invalid`] record; everything else is still programmed. A bad endpoint
//!   address skips its whole slice. A Service port with a protocol other than TCP or UDP (SCTP)
//!   skips only that port. A Service without a cluster IP (only a manifest can lack one; the
//!   API server always allocates it) is refused as `missing_cluster_ip`. When two Services claim
//!   the same frontend, the first in namespace/name order keeps it and the other one's frontend
//!   is dropped and recorded as `frontend_conflict`.
//!
//! Not modelled yet: session affinity, `loadBalancerSourceRanges`, topology-aware routing
//! (hints, `trafficDistribution`), health check node ports.
use std::{
    collections::{BTreeMap, btree_map::Entry},
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

pub use crate::invalid::{Invalid, reason};
use crate::{
    state::{
        BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, Proto,
        Scope, ServicePortRef,
    },
    store::{ObjectKey, Store},
};

/// Label of an EndpointSlice naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Label of headless Services' EndpointSlices; kube-proxy never programs such objects.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label handing an object to an alternative service proxy.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// How `desired` reads the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// Objects labelled `service.kubernetes.io/service-proxy-name` with this value are ours;
    /// objects with any other value belong to another proxy.
    pub service_proxy_name: Option<String>,
    /// Larger EndpointSlices are refused. The default is the API server's own limit (1000), so
    /// only a hand-written manifest can exceed it.
    pub max_endpoints_per_slice: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            service_proxy_name: None,
            max_endpoints_per_slice: 1000,
        }
    }
}

/// The node the state is computed for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name, compared with endpoints' `nodeName`.
    pub name: String,
    /// Addresses that NodePorts answer on.
    pub addresses: Vec<Ipv4Addr>,
}

impl NodeInfo {
    /// The node's name and its `InternalIP` and `ExternalIP` IPv4 addresses, in the Node's order,
    /// without duplicates.
    #[must_use]
    pub fn from_node(node: &Node) -> Self {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut addresses = Vec::new();
        let listed = node.status.as_ref().and_then(|s| s.addresses.as_deref());
        for address in listed.unwrap_or_default() {
            if address.type_ != "InternalIP" && address.type_ != "ExternalIP" {
                continue;
            }
            match IpAddr::from_str(&address.address) {
                Ok(IpAddr::V4(ip)) if !addresses.contains(&ip) => addresses.push(ip),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    node = name,
                    address = address.address,
                    "ignoring a node address that does not parse"
                ),
            }
        }
        Self { name, addresses }
    }

    /// [`NodeInfo::from_node`] of the Node called `name` in `store`.
    #[must_use]
    pub fn from_store(store: &Store, name: &str) -> Option<Self> {
        store.node(name).map(Self::from_node)
    }
}

/// What `desired` computed: the state to program and what it had to leave out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: DesiredState,
    /// Objects (or parts of objects) refused, in the order met.
    pub invalid: Vec<Invalid>,
    /// EndpointSlices of address type IPv6, which this IPv4 datapath does not use.
    pub ipv6_slices_ignored: usize,
}

/// The desired datapath state of `node` for the objects in `store`. See the module doc.
#[must_use]
pub fn desired(store: &Store, node: &NodeInfo, opts: &ModelOptions) -> Desired {
    let mut model = Model {
        node,
        node_addresses: dedup(node.addresses.iter().copied()),
        out: Desired::default(),
    };
    let slices = model.slices_by_service(store, opts);
    for (key, service) in store.services() {
        let Some(service) = model.service(key, service, opts) else {
            continue;
        };
        let slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        for port in &service.ports {
            model.add_port(&service, port, slices);
        }
    }
    model.out
}

/// Why an object (or port) is refused.
struct Refusal {
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// A Service as the model uses it, validated.
struct ValidService<'a> {
    key: &'a ObjectKey,
    type_: ServiceType,
    cluster_ip: Ipv4Addr,
    external_ips: Vec<Ipv4Addr>,
    ingress_ips: Vec<Ipv4Addr>,
    external_local: bool,
    internal_local: bool,
    publish_not_ready: bool,
    ports: Vec<ValidPort<'a>>,
}

/// `spec.type`, of the Services that are programmed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

struct ValidPort<'a> {
    name: &'a str,
    proto: Proto,
    port: u16,
    node_port: Option<u16>,
}

/// An EndpointSlice as the model uses it, validated.
struct ValidSlice<'a> {
    ports: Vec<SlicePort<'a>>,
    endpoints: Vec<SliceEndpoint<'a>>,
}

struct SlicePort<'a> {
    name: &'a str,
    proto: Proto,
    port: u16,
}

struct SliceEndpoint<'a> {
    addr: Ipv4Addr,
    node_name: Option<&'a str>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// One endpoint of one service port after merging its slices.
#[derive(Clone, Copy)]
struct Endpoint {
    backend: BackendSpec,
    ready: bool,
    serving: bool,
    terminating: bool,
}

struct Model<'n> {
    node: &'n NodeInfo,
    node_addresses: Vec<Ipv4Addr>,
    out: Desired,
}

impl Model<'_> {
    fn refuse(&mut self, kind: &'static str, key: &ObjectKey, refusal: Refusal) {
        tracing::warn!(
            kind,
            object = %key,
            reason = refusal.reason,
            detail = refusal.detail,
            "skipping invalid object"
        );
        self.out.invalid.push(Invalid {
            kind,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            reason: refusal.reason,
            detail: refusal.detail,
        });
    }

    /// Valid IPv4 EndpointSlices grouped by the key of their Service.
    fn slices_by_service<'s>(
        &mut self,
        store: &'s Store,
        opts: &ModelOptions,
    ) -> BTreeMap<ObjectKey, Vec<ValidSlice<'s>>> {
        let mut by_service: BTreeMap<ObjectKey, Vec<ValidSlice<'s>>> = BTreeMap::new();
        for (key, slice) in store.endpoint_slices() {
            if let Some(why) = not_ours(&slice.metadata, opts) {
                tracing::debug!(slice = %key, why, "ignoring EndpointSlice");
                continue;
            }
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SERVICE_NAME));
            let Some(service) = service else {
                tracing::debug!(slice = %key, "ignoring EndpointSlice without a service-name label");
                continue;
            };
            match slice.address_type.as_str() {
                "IPv4" => {}
                "IPv6" => {
                    self.out.ipv6_slices_ignored += 1;
                    continue;
                }
                other => {
                    tracing::debug!(slice = %key, address_type = other, "ignoring EndpointSlice");
                    continue;
                }
            }
            match parse_slice(slice, opts) {
                Ok(valid) => by_service
                    .entry(ObjectKey::new(key.namespace.clone(), service.clone()))
                    .or_default()
                    .push(valid),
                Err(refusal) => self.refuse("EndpointSlice", key, refusal),
            }
        }
        by_service
    }

    /// The Service validated, or None when it is not programmed (refused or not ours).
    fn service<'s>(
        &mut self,
        key: &'s ObjectKey,
        service: &'s Service,
        opts: &ModelOptions,
    ) -> Option<ValidService<'s>> {
        if let Some(why) = not_ours(&service.metadata, opts) {
            tracing::debug!(service = %key, why, "not programming Service");
            return None;
        }
        let (valid, unsupported) = match parse_service(key, service) {
            Ok(Parsed::Program(valid, unsupported)) => (valid, unsupported),
            Ok(Parsed::Skip(why)) => {
                tracing::debug!(service = %key, why, "not programming Service");
                return None;
            }
            Err(refusal) => {
                self.refuse("Service", key, refusal);
                return None;
            }
        };
        for refusal in unsupported {
            self.refuse("Service", key, refusal);
        }
        Some(valid)
    }

    /// Every frontend of one service port.
    fn add_port(
        &mut self,
        service: &ValidService<'_>,
        port: &ValidPort<'_>,
        slices: &[ValidSlice<'_>],
    ) {
        let endpoints = merge_endpoints(slices, port, service.publish_not_ready, &self.node.name);
        let cluster = select(&endpoints, false);
        let local = select(&endpoints, true);
        let service_ref = ServicePortRef {
            namespace: service.key.namespace.clone(),
            name: service.key.name.clone(),
            port_name: port.name.to_owned(),
        };
        let spec = |kind, backends: &[BackendSpec], snat_remote| FrontendSpec {
            service: service_ref.clone(),
            kind,
            backends: backends.to_vec(),
            snat_remote,
        };

        // kube-proxy applies internalTrafficPolicy to all cluster-IP traffic, whatever its source.
        let to_cluster_ip = if service.internal_local {
            &local
        } else {
            &cluster
        };
        self.add_frontend(
            service.cluster_ip,
            port.port,
            port.proto,
            spec(FrontendKind::ClusterIp, to_cluster_ip, true),
            spec(FrontendKind::ClusterIp, to_cluster_ip, true),
        );

        // NodePort, LoadBalancer and ExternalIp share the external policy.
        let mut external = Vec::new();
        if let Some(node_port) = port
            .node_port
            .filter(|_| service.type_ != ServiceType::ClusterIp)
        {
            for &addr in &self.node_addresses {
                external.push((addr, node_port, FrontendKind::NodePort));
            }
        }
        for &addr in &service.external_ips {
            external.push((addr, port.port, FrontendKind::ExternalIp));
        }
        if service.type_ == ServiceType::LoadBalancer {
            for &addr in &service.ingress_ips {
                external.push((addr, port.port, FrontendKind::LoadBalancer));
            }
        }
        let (from_nic, snat) = if service.external_local {
            (&local, false)
        } else {
            (&cluster, true)
        };
        for (addr, frontend_port, kind) in external {
            self.add_frontend(
                addr,
                frontend_port,
                port.proto,
                spec(kind, from_nic, snat),
                spec(kind, &cluster, true),
            );
        }
    }

    /// Adds one frontend in both scopes, unless another service port already has it.
    fn add_frontend(
        &mut self,
        addr: Ipv4Addr,
        port: u16,
        proto: Proto,
        external: FrontendSpec,
        internal: FrontendSpec,
    ) {
        let at = |scope| FrontendAddr {
            addr,
            port,
            proto,
            scope,
        };
        // Both scopes are always added together, so the External entry decides for both.
        if let Some(owner) = self.out.state.frontends.get(&at(Scope::External)) {
            let detail = format!(
                "{kind:?} frontend {addr}:{port}/{proto} of port '{port_name}' is already \
                 {owner_kind:?} of {owner_service}",
                kind = external.kind,
                port_name = external.service.port_name,
                owner_kind = owner.kind,
                owner_service = owner.service,
            );
            let key = ObjectKey::new(
                external.service.namespace.clone(),
                external.service.name.clone(),
            );
            self.refuse(
                "Service",
                &key,
                Refusal::new(reason::FRONTEND_CONFLICT, detail),
            );
            return;
        }
        for (scope, spec) in [(Scope::External, external), (Scope::Internal, internal)] {
            if let Entry::Vacant(entry) = self.out.state.frontends.entry(at(scope)) {
                entry.insert(spec);
            }
        }
    }
}

/// Why an object belongs to someone else (kube-proxy's informer label selector), if it does.
fn not_ours(meta: &ObjectMeta, opts: &ModelOptions) -> Option<&'static str> {
    let labels = meta.labels.as_ref()?;
    if labels.contains_key(LABEL_HEADLESS) {
        return Some("labelled headless");
    }
    match labels.get(LABEL_SERVICE_PROXY_NAME) {
        Some(name) if opts.service_proxy_name.as_ref() != Some(name) => {
            Some("labelled for another service proxy")
        }
        _ => None,
    }
}

enum Parsed<'a> {
    /// Program it; the refusals are ports with an unsupported protocol, left out.
    Program(ValidService<'a>, Vec<Refusal>),
    /// Not programmed, and nothing wrong with it.
    Skip(&'static str),
}

fn parse_service<'a>(key: &'a ObjectKey, service: &'a Service) -> Result<Parsed<'a>, Refusal> {
    let Some(spec) = service.spec.as_ref() else {
        return Err(Refusal::new(reason::MISSING_CLUSTER_IP, "no spec"));
    };
    let type_ = match spec.type_.as_deref() {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => return Ok(Parsed::Skip("type ExternalName")),
        Some(other) => return Err(Refusal::new(reason::BAD_FIELD, format!("type {other:?}"))),
    };

    // spec.clusterIPs is authoritative when set; spec.clusterIP is its first element.
    let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty())
            .into_iter()
            .collect(),
    };
    match cluster_ips.first() {
        None => {
            return Err(Refusal::new(
                reason::MISSING_CLUSTER_IP,
                "no spec.clusterIP",
            ));
        }
        Some(&"None") => return Ok(Parsed::Skip("headless (clusterIP None)")),
        Some(_) => {}
    }
    let Some(cluster_ip) = first_ipv4(&cluster_ips, "clusterIP")? else {
        return Ok(Parsed::Skip("no IPv4 cluster IP"));
    };

    let external_local = traffic_policy(
        spec.external_traffic_policy.as_deref(),
        "externalTrafficPolicy",
    )?;
    let internal_local = traffic_policy(
        spec.internal_traffic_policy.as_deref(),
        "internalTrafficPolicy",
    )?;
    let external_ips = ipv4s(
        spec.external_ips.as_deref().unwrap_or_default(),
        "externalIP",
    )?;

    let mut ingress = Vec::new();
    if type_ == ServiceType::LoadBalancer {
        let status = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref());
        for entry in status
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default()
        {
            let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                continue; // hostname-only ingress: nothing to capture
            };
            // ipMode Proxy: the load balancer proxies, so traffic must really go to it.
            if matches!(entry.ip_mode.as_deref(), None | Some("VIP")) {
                ingress.push(ip.to_owned());
            }
        }
    }
    let ingress_ips = ipv4s(&ingress, "load balancer ingress IP")?;

    let (ports, unsupported) = parse_service_ports(spec.ports.as_deref().unwrap_or_default())?;
    Ok(Parsed::Program(
        ValidService {
            key,
            type_,
            cluster_ip,
            external_ips,
            ingress_ips,
            external_local,
            internal_local,
            publish_not_ready: spec.publish_not_ready_addresses == Some(true),
            ports,
        },
        unsupported,
    ))
}

fn parse_service_ports(
    ports: &[ServicePort],
) -> Result<(Vec<ValidPort<'_>>, Vec<Refusal>), Refusal> {
    let mut valid = Vec::new();
    let mut unsupported = Vec::new();
    let mut seen: Vec<(i32, &str, &str)> = Vec::new();
    for p in ports {
        let name = p.name.as_deref().unwrap_or_default();
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        let what = || format!("port {:?} ({}/{protocol})", name, p.port);
        let port = port_number(p.port).ok_or_else(|| {
            Refusal::new(reason::BAD_PORT, format!("{}: port out of range", what()))
        })?;
        let node_port = match p.node_port {
            None => None,
            Some(n) => Some(port_number(n).ok_or_else(|| {
                Refusal::new(
                    reason::BAD_NODE_PORT,
                    format!("{}: nodePort {n} out of range", what()),
                )
            })?),
        };
        match &p.target_port {
            Some(IntOrString::Int(n)) if port_number(*n).is_none() => {
                let detail = format!("{}: targetPort {n} out of range", what());
                return Err(Refusal::new(reason::BAD_PORT, detail));
            }
            Some(IntOrString::String(s)) if s.is_empty() => {
                let detail = format!("{}: empty targetPort name", what());
                return Err(Refusal::new(reason::BAD_PORT, detail));
            }
            _ => {}
        }
        if let Some(&(_, other, _)) = seen.iter().find(|&&(n, other_name, proto)| {
            (n == p.port && proto == protocol) || other_name == name
        }) {
            let detail = format!("{}: same port/protocol or name as port {other:?}", what());
            return Err(Refusal::new(reason::DUPLICATE_PORT, detail));
        }
        seen.push((p.port, name, protocol));
        match parse_proto(protocol) {
            Some(proto) => valid.push(ValidPort {
                name,
                proto,
                port,
                node_port,
            }),
            None => unsupported.push(Refusal::new(
                reason::UNSUPPORTED_PROTOCOL,
                format!("{}: protocol not supported, port skipped", what()),
            )),
        }
    }
    Ok((valid, unsupported))
}

fn parse_slice<'a>(
    slice: &'a EndpointSlice,
    opts: &ModelOptions,
) -> Result<ValidSlice<'a>, Refusal> {
    let listed = slice.endpoints.as_deref().unwrap_or_default();
    if listed.len() > opts.max_endpoints_per_slice {
        let detail = format!(
            "{} endpoints, more than the maximum of {}",
            listed.len(),
            opts.max_endpoints_per_slice
        );
        return Err(Refusal::new(reason::TOO_MANY_ENDPOINTS, detail));
    }
    let mut ports: Vec<SlicePort<'a>> = Vec::new();
    for p in slice.ports.as_deref().unwrap_or_default() {
        let name = p.name.as_deref().unwrap_or_default();
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        // No port number means "all ports", which no service port can use.
        let Some(number) = p.port else { continue };
        let port = port_number(number).ok_or_else(|| {
            Refusal::new(
                reason::BAD_PORT,
                format!("port {name:?} ({number}/{protocol}) out of range"),
            )
        })?;
        // Protocols we do not translate can only match service ports we skip.
        let Some(proto) = parse_proto(protocol) else {
            continue;
        };
        if ports.iter().any(|o| o.name == name && o.proto == proto) {
            let detail = format!("port {name:?} ({protocol}) listed twice");
            return Err(Refusal::new(reason::DUPLICATE_PORT, detail));
        }
        ports.push(SlicePort { name, proto, port });
    }
    let mut endpoints = Vec::with_capacity(listed.len());
    for endpoint in listed {
        let first = endpoint.addresses.first().map(String::as_str);
        let addr = first
            .and_then(|a| Ipv4Addr::from_str(a).ok())
            .ok_or_else(|| {
                let detail = match first {
                    Some(a) => format!("endpoint address {a:?} is not IPv4"),
                    None => "endpoint without addresses".to_owned(),
                };
                Refusal::new(reason::BAD_IP, detail)
            })?;
        let conditions = endpoint.conditions.as_ref();
        endpoints.push(SliceEndpoint {
            addr,
            node_name: endpoint.node_name.as_deref(),
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        });
    }
    Ok(ValidSlice { ports, endpoints })
}

/// The endpoints of one service port across its slices, one per address:port, sorted.
fn merge_endpoints(
    slices: &[ValidSlice<'_>],
    port: &ValidPort<'_>,
    publish_not_ready: bool,
    node_name: &str,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<BackendAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.proto == port.proto)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let addr = BackendAddr {
                addr: e.addr,
                port: slice_port.port,
                proto: port.proto,
            };
            let endpoint = Endpoint {
                backend: BackendSpec {
                    addr,
                    local: e.node_name == Some(node_name),
                },
                ready: e.ready || publish_not_ready,
                serving: e.serving,
                terminating: e.terminating,
            };
            match merged.entry(addr) {
                Entry::Vacant(entry) => {
                    entry.insert(endpoint);
                }
                Entry::Occupied(mut entry) if endpoint.ready && !entry.get().ready => {
                    entry.insert(endpoint);
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    merged.into_values().collect()
}

/// kube-proxy's endpoint set: the ready endpoints (only this node's if `local_only`), or if
/// there are none, the serving and terminating ones.
fn select(endpoints: &[Endpoint], local_only: bool) -> Vec<BackendSpec> {
    let candidates = || endpoints.iter().filter(|e| !local_only || e.backend.local);
    let ready: Vec<BackendSpec> = candidates()
        .filter(|e| e.ready)
        .map(|e| e.backend)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates()
        .filter(|e| e.serving && e.terminating)
        .map(|e| e.backend)
        .collect()
}

fn traffic_policy(policy: Option<&str>, field: &str) -> Result<bool, Refusal> {
    match policy {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(Refusal::new(
            reason::BAD_FIELD,
            format!("{field} {other:?}"),
        )),
    }
}

fn parse_proto(protocol: &str) -> Option<Proto> {
    match protocol {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// The first IPv4 address of `ips`; every entry must parse.
fn first_ipv4(ips: &[&str], field: &str) -> Result<Option<Ipv4Addr>, Refusal> {
    let mut first = None;
    for ip in ips {
        match IpAddr::from_str(ip) {
            Ok(IpAddr::V4(v4)) => {
                first.get_or_insert(v4);
            }
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(Refusal::new(reason::BAD_IP, format!("{field} {ip:?}"))),
        }
    }
    Ok(first)
}

/// The IPv4 addresses of `ips` without duplicates; every entry must parse.
fn ipv4s(ips: &[String], field: &str) -> Result<Vec<Ipv4Addr>, Refusal> {
    let mut v4 = Vec::new();
    for ip in ips {
        match IpAddr::from_str(ip) {
            Ok(IpAddr::V4(addr)) => v4.push(addr),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(Refusal::new(reason::BAD_IP, format!("{field} {ip:?}"))),
        }
    }
    Ok(dedup(v4))
}

/// `items` without repeats, first occurrence kept.
fn dedup(items: impl IntoIterator<Item = Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde::Deserialize as _;

    use super::*;
    use crate::source::manifests;

    /// The objects of a YAML manifest, put in a store.
    fn store(yaml: &str) -> Store {
        let mut store = Store::new();
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_yaml::Value::deserialize(document).expect("test YAML parses");
            let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
            let applied = match kind.unwrap_or_default() {
                "Service" => store
                    .apply(serde_yaml::from_value::<Service>(value).expect("Service"))
                    .map(drop),
                "EndpointSlice" => store
                    .apply(serde_yaml::from_value::<EndpointSlice>(value).expect("EndpointSlice"))
                    .map(drop),
                "Node" => store
                    .apply(serde_yaml::from_value::<Node>(value).expect("Node"))
                    .map(drop),
                other => panic!("test YAML holds a {other:?}"),
            };
            applied.expect("test objects are named");
        }
        store
    }

    /// One line per frontend, e.g. `ext 10.96.0.1:80/TCP ClusterIp default/web snat
    /// [10.244.1.5:8080* 10.244.2.5:8080]` (`*` marks local backends).
    fn render(state: &DesiredState) -> Vec<String> {
        let mut lines: Vec<String> = state
            .frontends
            .iter()
            .map(|(at, spec)| {
                let scope = match at.scope {
                    Scope::External => "ext",
                    Scope::Internal => "int",
                };
                let backends: Vec<String> = spec
                    .backends
                    .iter()
                    .map(|b| {
                        let local = if b.local { "*" } else { "" };
                        format!("{}:{}{local}", b.addr.addr, b.addr.port)
                    })
                    .collect();
                let snat = if spec.snat_remote { "snat" } else { "nosnat" };
                format!(
                    "{scope} {}:{}/{} {:?} {} {snat} [{}]",
                    at.addr,
                    at.port,
                    at.proto,
                    spec.kind,
                    spec.service,
                    backends.join(" ")
                )
            })
            .collect();
        lines.sort();
        lines
    }

    /// Expected lines; `both ...` stands for the same line in the ext and int scopes.
    fn expand(expected: &[&str]) -> Vec<String> {
        let mut lines = Vec::new();
        for line in expected {
            match line.strip_prefix("both ") {
                Some(rest) => {
                    lines.push(format!("ext {rest}"));
                    lines.push(format!("int {rest}"));
                }
                None => lines.push((*line).to_owned()),
            }
        }
        lines.sort();
        lines
    }

    struct Case {
        name: &'static str,
        yaml: String,
        node_name: &'static str,
        node_addresses: &'static [&'static str],
        service_proxy_name: Option<&'static str>,
        max_endpoints_per_slice: usize,
        frontends: &'static [&'static str],
        /// `Kind namespace/name reason`
        invalid: &'static [&'static str],
        ipv6_slices_ignored: usize,
    }

    fn base() -> Case {
        Case {
            name: "",
            yaml: String::new(),
            node_name: "node-1",
            node_addresses: &["192.168.50.11"],
            service_proxy_name: None,
            max_endpoints_per_slice: 1000,
            frontends: &[],
            invalid: &[],
            ipv6_slices_ignored: 0,
        }
    }

    /// ClusterIP Service default/web, 10.96.0.1:80 → 8080.
    macro_rules! web {
        () => {
            "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{port: 80, targetPort: 8080}]
"
        };
    }

    /// The slice of default/web: 10.244.1.5 on node-1, 10.244.2.5 on node-2, port 8080.
    macro_rules! web_slice {
        () => {
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{port: 8080, protocol: TCP, name: ''}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: true}}
  - {addresses: [10.244.2.5], nodeName: node-2, conditions: {ready: true}}
"
        };
    }

    /// Service default/web as NodePort (nodePort 30080) with the given spec lines added.
    macro_rules! web_node_port {
        ($extra:literal) => {
            concat!(
                "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
",
                $extra
            )
        };
    }

    const BOTH_WEB: &str =
        "both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080* 10.244.2.5:8080]";

    #[expect(
        clippy::too_many_lines,
        reason = "a table of cases, one entry per rule"
    )]
    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "tomcat6: NodePort 80->8080, nodePort 32510, seen from node-1",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: tomcat6, namespace: default, labels: {app: tomcat6}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  selector: {app: tomcat6}
  ports: [{port: 80, targetPort: 8080, nodePort: 32510}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: tomcat6-x7k2p
  namespace: default
  labels: {kubernetes.io/service-name: tomcat6}
addressType: IPv4
ports: [{name: '', port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: true, serving: true, terminating: false}}
  - {addresses: [10.244.2.5], nodeName: node-2, conditions: {ready: true, serving: true, terminating: false}}
  - {addresses: [10.244.3.5], nodeName: node-3, conditions: {ready: true, serving: true, terminating: false}}
".into(),
                frontends: &[
                    "both 10.96.0.10:80/TCP ClusterIp default/tomcat6 snat [10.244.1.5:8080* 10.244.2.5:8080 10.244.3.5:8080]",
                    "both 192.168.50.11:32510/TCP NodePort default/tomcat6 snat [10.244.1.5:8080* 10.244.2.5:8080 10.244.3.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "ClusterIP is the default type; other nodes' endpoints are remote",
                yaml: concat!(web!(), "---", web_slice!()).into(),
                frontends: &[BOTH_WEB],
                ..base()
            },
            Case {
                name: "seen from a node without endpoints, no backend is local",
                yaml: concat!(web!(), "---", web_slice!()).into(),
                node_name: "node-3",
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080 10.244.2.5:8080]"],
                ..base()
            },
            Case {
                name: "an endpoint without nodeName is not local",
                yaml: concat!(
                    web!(),
                    "---",
                    "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.5]}]
"
                ).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080]"],
                ..base()
            },
            Case {
                name: "a Service without endpoints is programmed with no backend (drop)",
                yaml: web!().into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat []"],
                ..base()
            },
            Case {
                name: "headless (clusterIP None) is not programmed",
                yaml: concat!(web!(), "---", web_slice!()).replace("10.96.0.1", "None"),
                ..base()
            },
            Case {
                name: "ExternalName is not programmed",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {type: ExternalName, externalName: db.example.com, ports: [{port: 5432}]}
".into(),
                ..base()
            },
            Case {
                name: "the service.kubernetes.io/headless label keeps a Service out",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace(
                        "metadata: {name: web, namespace: default}",
                        "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/headless: ''}}",
                    ),
                ..base()
            },
            Case {
                name: "service-proxy-name label: another proxy's when we have no name",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace(
                        "metadata: {name: web, namespace: default}",
                        "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: xlb}}",
                    ),
                ..base()
            },
            Case {
                name: "service-proxy-name label equal to ours: programmed",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace(
                        "metadata: {name: web, namespace: default}",
                        "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: xlb}}",
                    ),
                service_proxy_name: Some("xlb"),
                frontends: &[BOTH_WEB],
                ..base()
            },
            Case {
                name: "service-proxy-name label of another proxy: skipped even when we have a name",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace(
                        "metadata: {name: web, namespace: default}",
                        "metadata: {name: web, namespace: default, labels: {service.kubernetes.io/service-proxy-name: other}}",
                    ),
                service_proxy_name: Some("xlb"),
                ..base()
            },
            Case {
                name: "an EndpointSlice labelled for another proxy is ignored",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace(
                        "labels: {kubernetes.io/service-name: web}",
                        "labels: {kubernetes.io/service-name: web, service.kubernetes.io/service-proxy-name: other}",
                    ),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat []"],
                ..base()
            },
            Case {
                name: "internalTrafficPolicy Local: the cluster IP uses local endpoints in both scopes",
                yaml: concat!(web!(), "  internalTrafficPolicy: Local\n---", web_slice!()).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080*]"],
                ..base()
            },
            Case {
                name: "internalTrafficPolicy Local without a local endpoint: no backend",
                yaml: concat!(web!(), "  internalTrafficPolicy: Local\n---", web_slice!()).into(),
                node_name: "node-3",
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat []"],
                ..base()
            },
            Case {
                name: "externalTrafficPolicy Local: NIC traffic to local endpoints, client address kept; pods use all",
                yaml: concat!(web_node_port!("  externalTrafficPolicy: Local\n"), "---", web_slice!()).into(),
                frontends: &[
                    BOTH_WEB,
                    "ext 192.168.50.11:30080/TCP NodePort default/web nosnat [10.244.1.5:8080*]",
                    "int 192.168.50.11:30080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "externalTrafficPolicy Local without a local endpoint: NIC traffic dropped",
                yaml: concat!(web_node_port!("  externalTrafficPolicy: Local\n"), "---", web_slice!()).into(),
                node_name: "node-3",
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080 10.244.2.5:8080]",
                    "ext 192.168.50.11:30080/TCP NodePort default/web nosnat []",
                    "int 192.168.50.11:30080/TCP NodePort default/web snat [10.244.1.5:8080 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "NodePorts answer on every node address, each once",
                yaml: concat!(web_node_port!(""), "---", web_slice!()).into(),
                node_addresses: &["192.168.50.11", "10.0.0.11", "192.168.50.11"],
                frontends: &[
                    BOTH_WEB,
                    "both 192.168.50.11:30080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                    "both 10.0.0.11:30080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "a nodePort outside 30000-32767 is accepted",
                yaml: concat!(web_node_port!(""), "---", web_slice!()).replace("30080", "8080"),
                frontends: &[
                    BOTH_WEB,
                    "both 192.168.50.11:8080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "LoadBalancer: cluster IP, node ports and ingress IPs (hostname-only ingress skipped)",
                yaml: concat!(
                    web_node_port!("status: {loadBalancer: {ingress: [{ip: 203.0.113.10}, {hostname: lb.example.com}]}}\n"),
                    "---",
                    web_slice!()
                )
                .replace("type: NodePort", "type: LoadBalancer"),
                frontends: &[
                    BOTH_WEB,
                    "both 192.168.50.11:30080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                    "both 203.0.113.10:80/TCP LoadBalancer default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "LoadBalancer with allocateLoadBalancerNodePorts false has no node ports",
                yaml: concat!(
                    "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  allocateLoadBalancerNodePorts: false
  clusterIP: 10.96.0.1
  ports: [{port: 80, targetPort: 8080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}
---",
                    web_slice!()
                ).into(),
                frontends: &[
                    BOTH_WEB,
                    "both 203.0.113.10:80/TCP LoadBalancer default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "LoadBalancer ingress with ipMode Proxy is left to the load balancer",
                yaml: concat!(
                    web_node_port!(
                        "status: {loadBalancer: {ingress: [{ip: 203.0.113.10, ipMode: Proxy}, {ip: 203.0.113.11, ipMode: VIP}]}}\n"
                    ),
                    "---",
                    web_slice!()
                )
                .replace("type: NodePort", "type: LoadBalancer"),
                frontends: &[
                    BOTH_WEB,
                    "both 192.168.50.11:30080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                    "both 203.0.113.11:80/TCP LoadBalancer default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "LoadBalancer with externalTrafficPolicy Local",
                yaml: concat!(
                    web_node_port!("  externalTrafficPolicy: Local\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}\n"),
                    "---",
                    web_slice!()
                )
                .replace("type: NodePort", "type: LoadBalancer"),
                frontends: &[
                    BOTH_WEB,
                    "ext 192.168.50.11:30080/TCP NodePort default/web nosnat [10.244.1.5:8080*]",
                    "int 192.168.50.11:30080/TCP NodePort default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                    "ext 203.0.113.10:80/TCP LoadBalancer default/web nosnat [10.244.1.5:8080*]",
                    "int 203.0.113.10:80/TCP LoadBalancer default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "ingress IPs of a Service that is not a LoadBalancer are ignored",
                yaml: concat!(web!(), "status: {loadBalancer: {ingress: [{ip: 203.0.113.10}]}}\n---", web_slice!()).into(),
                frontends: &[BOTH_WEB],
                ..base()
            },
            Case {
                name: "externalIPs (IPv6 ones ignored)",
                yaml: concat!(web!(), "  externalIPs: [198.51.100.7, '2001:db8::7']\n---", web_slice!()).into(),
                frontends: &[
                    BOTH_WEB,
                    "both 198.51.100.7:80/TCP ExternalIp default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "externalIPs follow externalTrafficPolicy Local",
                yaml: concat!(
                    web!(),
                    "  externalIPs: [198.51.100.7]\n  externalTrafficPolicy: Local\n---",
                    web_slice!()
                ).into(),
                frontends: &[
                    BOTH_WEB,
                    "ext 198.51.100.7:80/TCP ExternalIp default/web nosnat [10.244.1.5:8080*]",
                    "int 198.51.100.7:80/TCP ExternalIp default/web snat [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "multi-port: each port its own frontend, slice ports matched by name",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.1
  ports:
    - {name: http, port: 80, targetPort: http}
    - {name: metrics, port: 9090, targetPort: 9100}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: metrics, port: 9100}, {name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-1}]
".into(),
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web:http snat [10.244.1.5:8080*]",
                    "both 10.96.0.1:9090/TCP ClusterIp default/web:metrics snat [10.244.1.5:9100*]",
                ],
                ..base()
            },
            Case {
                name: "a named targetPort is resolved by the slice",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace("targetPort: 8080", "targetPort: web")
                    .replace("ports: [{port: 8080,", "ports: [{port: 8081,"),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8081* 10.244.2.5:8081]"],
                ..base()
            },
            Case {
                name: "a numeric targetPort is overridden by the slice's port",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace("ports: [{port: 8080,", "ports: [{port: 9999,"),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:9999* 10.244.2.5:9999]"],
                ..base()
            },
            Case {
                name: "two slices with different ports for one service port (named port moving)",
                yaml: concat!(
                    web!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8081}]
endpoints: [{addresses: [10.244.2.5], nodeName: node-2}]
"
                ).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080* 10.244.2.5:8081]"],
                ..base()
            },
            Case {
                name: "a slice port with another name does not serve the service port",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace("ports: [{port: 80, targetPort: 8080}]", "ports: [{name: http, port: 80, targetPort: 8080}]"),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web:http snat []"],
                ..base()
            },
            Case {
                name: "same port over TCP and UDP; slice ports matched by name and protocol",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.53
  ports:
    - {name: dns, port: 53, protocol: UDP}
    - {name: dns-tcp, port: 53, protocol: TCP}
    - {name: other, port: 54, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: other, port: 54, protocol: TCP}
endpoints: [{addresses: [10.244.2.7], nodeName: node-2}]
".into(),
                frontends: &[
                    "both 10.96.0.53:53/UDP ClusterIp kube-system/dns:dns snat [10.244.2.7:53]",
                    "both 10.96.0.53:53/TCP ClusterIp kube-system/dns:dns-tcp snat [10.244.2.7:53]",
                    "both 10.96.0.53:54/UDP ClusterIp kube-system/dns:other snat []",
                ],
                ..base()
            },
            Case {
                name: "an SCTP port is skipped and reported; the TCP port is programmed",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.1
  ports:
    - {name: sig, port: 3868, protocol: SCTP}
    - {name: http, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: sig, port: 3868, protocol: SCTP}, {name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-1}]
".into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web:http snat [10.244.1.5:8080*]"],
                invalid: &["Service default/web unsupported_protocol"],
                ..base()
            },
            Case {
                name: "an unknown protocol is unsupported too",
                yaml: web!().replace("targetPort: 8080", "protocol: ICMP"),
                invalid: &["Service default/web unsupported_protocol"],
                ..base()
            },
            Case {
                name: "IPv6 slices are ignored and counted, FQDN slices ignored",
                yaml: concat!(
                    web!(),
                    "---",
                    web_slice!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ['fd00::5'], nodeName: node-1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{port: 8080}]
endpoints: [{addresses: [web.example.com]}]
"
                ).into(),
                frontends: &[BOTH_WEB],
                ipv6_slices_ignored: 1,
                ..base()
            },
            Case {
                name: "not-ready endpoints are left out; an absent ready condition means ready",
                yaml: concat!(
                    web!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1}
  - {addresses: [10.244.2.5], nodeName: node-2, conditions: {ready: false}}
  - {addresses: [10.244.3.5], nodeName: node-3, conditions: {ready: true}}
  - {addresses: [10.244.3.6], nodeName: node-3, conditions: {}}
"
                ).into(),
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080* 10.244.3.5:8080 10.244.3.6:8080]",
                ],
                ..base()
            },
            Case {
                name: "no ready endpoint: fall back to serving terminating ones",
                yaml: concat!(
                    web!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.2.5], nodeName: node-2, conditions: {ready: false, serving: false, terminating: true}}
  - {addresses: [10.244.3.5], nodeName: node-3, conditions: {ready: false, serving: true, terminating: false}}
"
                ).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080*]"],
                ..base()
            },
            Case {
                name: "a ready endpoint anywhere hides terminating ones from the cluster-wide set",
                yaml: concat!(
                    web!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.2.5], nodeName: node-2}
"
                ).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.2.5:8080]"],
                ..base()
            },
            Case {
                name: "the local set falls back on its own (eTP Local, only a terminating local endpoint)",
                yaml: concat!(
                    web_node_port!("  externalTrafficPolicy: Local\n"),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.2.5], nodeName: node-2}
"
                ).into(),
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.2.5:8080]",
                    "ext 192.168.50.11:30080/TCP NodePort default/web nosnat [10.244.1.5:8080*]",
                    "int 192.168.50.11:30080/TCP NodePort default/web snat [10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "publishNotReadyAddresses uses every endpoint",
                yaml: concat!(
                    web!(),
                    "  publishNotReadyAddresses: true
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: false, serving: false}}
  - {addresses: [10.244.2.5], nodeName: node-2, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.244.3.5], nodeName: node-3}
"
                ).into(),
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080* 10.244.2.5:8080 10.244.3.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "an address in two slices counts once, the ready copy wins",
                yaml: concat!(
                    web!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-1, conditions: {ready: false}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.5], nodeName: node-1}, {addresses: [10.244.1.5], nodeName: node-1}]
"
                ).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat [10.244.1.5:8080*]"],
                ..base()
            },
            Case {
                name: "slices join by namespace and service-name label only",
                yaml: concat!(
                    web!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.5]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-def}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.1.6]}]
"
                ).into(),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat []"],
                ..base()
            },
            Case {
                name: "port 0 skips the Service; the others are still programmed",
                yaml: concat!(
                    web!(),
                    "---",
                    web_slice!(),
                    "---
apiVersion: v1
kind: Service
metadata: {name: broken}
spec: {clusterIP: 10.96.0.2, ports: [{port: 0}]}
"
                ).into(),
                frontends: &[BOTH_WEB],
                invalid: &["Service default/broken bad_port"],
                ..base()
            },
            Case {
                name: "port above 65535 is bad",
                yaml: web!().replace("port: 80,", "port: 70000,"),
                invalid: &["Service default/web bad_port"],
                ..base()
            },
            Case {
                name: "targetPort out of range is bad",
                yaml: web!().replace("targetPort: 8080", "targetPort: 0"),
                invalid: &["Service default/web bad_port"],
                ..base()
            },
            Case {
                name: "nodePort 0 and nodePort above 65535 are bad",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: zero}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  ports: [{port: 80, nodePort: 0}]
---
apiVersion: v1
kind: Service
metadata: {name: huge}
spec:
  type: NodePort
  clusterIP: 10.96.0.2
  ports: [{port: 80, nodePort: 65536}]
"
                .into(),
                invalid: &["Service default/huge bad_node_port", "Service default/zero bad_node_port"],
                ..base()
            },
            Case {
                name: "an unparsable cluster IP is bad",
                yaml: web!().replace("10.96.0.1", "10.96.0.300"),
                invalid: &["Service default/web bad_ip"],
                ..base()
            },
            Case {
                name: "an unparsable external IP or ingress IP is bad",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.1
  externalIPs: [198.51.100.x]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.2
  ports: [{port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: not-an-ip}]}}
"
                .into(),
                invalid: &["Service default/lb bad_ip", "Service default/web bad_ip"],
                ..base()
            },
            Case {
                name: "two ports with the same port and protocol are a duplicate",
                yaml: web!().replace(
                    "ports: [{port: 80, targetPort: 8080}]",
                    "ports: [{name: a, port: 80}, {name: b, port: 80, protocol: TCP}]",
                ),
                invalid: &["Service default/web duplicate_port"],
                ..base()
            },
            Case {
                name: "two ports with the same name are a duplicate",
                yaml: web!().replace(
                    "ports: [{port: 80, targetPort: 8080}]",
                    "ports: [{name: a, port: 80}, {name: a, port: 81}]",
                ),
                invalid: &["Service default/web duplicate_port"],
                ..base()
            },
            Case {
                name: "an unknown type or traffic policy is bad",
                yaml: "
apiVersion: v1
kind: Service
metadata: {name: magic}
spec: {type: Magic, clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: sideways}
spec: {type: NodePort, externalTrafficPolicy: Sideways, clusterIP: 10.96.0.2, ports: [{port: 80}]}
"
                .into(),
                invalid: &["Service default/magic bad_field", "Service default/sideways bad_field"],
                ..base()
            },
            Case {
                name: "a Service without a cluster IP is refused",
                yaml: web!().replace("  clusterIP: 10.96.0.1\n", ""),
                invalid: &["Service default/web missing_cluster_ip"],
                ..base()
            },
            Case {
                name: "dual-stack uses the IPv4 cluster IP; IPv6-only is skipped",
                yaml: concat!(
                    "
apiVersion: v1
kind: Service
metadata: {name: v6only}
spec:
  clusterIP: 'fd00::1'
  clusterIPs: ['fd00::1']
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 'fd00::2'
  clusterIPs: ['fd00::2', 10.96.0.1]
  ports: [{port: 80, targetPort: 8080}]
---",
                    web_slice!()
                )
                .into(),
                frontends: &[BOTH_WEB],
                ..base()
            },
            Case {
                name: "a bad endpoint address skips its slice; other slices still count",
                yaml: concat!(
                    web!(),
                    "---",
                    web_slice!(),
                    "
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-bad, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.3.5], nodeName: node-3}, {addresses: [10.244.3.256], nodeName: node-3}]
"
                ).into(),
                frontends: &[BOTH_WEB],
                invalid: &["EndpointSlice default/web-bad bad_ip"],
                ..base()
            },
            Case {
                name: "a slice port out of range skips the slice",
                yaml: concat!(web!(), "---", web_slice!())
                    .replace("ports: [{port: 8080,", "ports: [{port: 65536,"),
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat []"],
                invalid: &["EndpointSlice default/web-abc bad_port"],
                ..base()
            },
            Case {
                name: "a slice with more endpoints than allowed is skipped",
                yaml: concat!(web!(), "---", web_slice!()).into(),
                max_endpoints_per_slice: 1,
                frontends: &["both 10.96.0.1:80/TCP ClusterIp default/web snat []"],
                invalid: &["EndpointSlice default/web-abc too_many_endpoints"],
                ..base()
            },
            Case {
                name: "two Services on one frontend: the first keeps it, the second is reported",
                yaml: concat!(
                    web!(),
                    "---",
                    web_slice!(),
                    "
---
apiVersion: v1
kind: Service
metadata: {name: zzz}
spec:
  clusterIP: 10.96.0.1
  externalIPs: [198.51.100.7]
  ports: [{port: 80, targetPort: 8080}]
"
                )
                .into(),
                frontends: &[
                    BOTH_WEB,
                    "both 198.51.100.7:80/TCP ExternalIp default/zzz snat []",
                ],
                invalid: &["Service default/zzz frontend_conflict"],
                ..base()
            },
        ]
    }

    fn run(case: &Case) -> Result<(), String> {
        let store = store(&case.yaml);
        let node = NodeInfo {
            name: case.node_name.to_owned(),
            addresses: case
                .node_addresses
                .iter()
                .map(|a| a.parse().expect("test address"))
                .collect(),
        };
        let opts = ModelOptions {
            service_proxy_name: case.service_proxy_name.map(str::to_owned),
            max_endpoints_per_slice: case.max_endpoints_per_slice,
        };
        let got = desired(&store, &node, &opts);
        let frontends = render(&got.state);
        let invalid: Vec<String> = got
            .invalid
            .iter()
            .map(|i| format!("{} {}/{} {}", i.kind, i.namespace, i.name, i.reason))
            .collect();
        let mut problems = Vec::new();
        if frontends != expand(case.frontends) {
            problems.push(format!(
                "frontends:\n  got      {frontends:#?}\n  expected {:#?}",
                expand(case.frontends)
            ));
        }
        if invalid != case.invalid {
            problems.push(format!(
                "invalid: got {invalid:?}, expected {:?}\n  details: {:?}",
                case.invalid,
                got.invalid.iter().map(|i| &i.detail).collect::<Vec<_>>()
            ));
        }
        if got.ipv6_slices_ignored != case.ipv6_slices_ignored {
            problems.push(format!(
                "ipv6_slices_ignored: got {}, expected {}",
                got.ipv6_slices_ignored, case.ipv6_slices_ignored
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }

    #[test]
    fn kube_proxy_semantics() {
        let cases = cases();
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|case| {
                run(case)
                    .err()
                    .map(|e| format!("case {:?}:\n{e}", case.name))
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n\n")
        );
    }

    #[test]
    fn the_tomcat6_example_end_to_end() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tomcat6.yaml");
        let (mut store, mut invalid) = manifests::load(&path).expect("example loads");
        manifests::load_str(
            "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: tomcat6-x7k2p, labels: {kubernetes.io/service-name: tomcat6}}
addressType: IPv4
ports: [{port: 8080, protocol: TCP}]
endpoints:
  - {addresses: [10.244.1.5], nodeName: node-1}
  - {addresses: [10.244.2.5], nodeName: node-2}
  - {addresses: [10.244.3.5], nodeName: node-3}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses:
    - {type: Hostname, address: node-1}
    - {type: InternalIP, address: 192.168.50.11}
",
            "slices.yaml",
            &mut store,
            &mut invalid,
        );
        assert!(invalid.is_empty(), "{invalid:?}");
        let node = NodeInfo::from_store(&store, "node-1").expect("node-1 is in the store");
        let got = desired(&store, &node, &ModelOptions::default());
        assert!(got.invalid.is_empty(), "{:?}", got.invalid);
        let all = "[10.244.1.5:8080* 10.244.2.5:8080 10.244.3.5:8080]";
        assert_eq!(
            render(&got.state),
            expand(&[
                &format!("both 10.96.0.10:80/TCP ClusterIp default/tomcat6 snat {all}"),
                &format!("both 192.168.50.11:32510/TCP NodePort default/tomcat6 snat {all}"),
            ])
        );
    }

    #[test]
    fn node_info_takes_internal_and_external_ipv4_addresses() {
        let store = store(
            "
apiVersion: v1
kind: Node
metadata: {name: node-1}
status:
  addresses:
    - {type: Hostname, address: node-1}
    - {type: InternalIP, address: 192.168.50.11}
    - {type: InternalIP, address: 'fd00::11'}
    - {type: ExternalIP, address: 203.0.113.11}
    - {type: InternalDNS, address: 10.0.0.1}
    - {type: ExternalIP, address: 192.168.50.11}
    - {type: ExternalIP, address: garbage}
",
        );
        let node = NodeInfo::from_store(&store, "node-1").expect("node-1");
        assert_eq!(node.name, "node-1");
        assert_eq!(
            node.addresses,
            [
                Ipv4Addr::new(192, 168, 50, 11),
                Ipv4Addr::new(203, 0, 113, 11)
            ]
        );
        assert!(NodeInfo::from_store(&store, "node-2").is_none());
    }

    #[test]
    fn the_same_store_gives_the_same_state() {
        let store = store(concat!(web_node_port!(""), "---", web_slice!()));
        let node = NodeInfo {
            name: "node-1".to_owned(),
            addresses: vec![Ipv4Addr::new(192, 168, 50, 11)],
        };
        let opts = ModelOptions::default();
        assert_eq!(desired(&store, &node, &opts), desired(&store, &node, &opts));
    }
}
