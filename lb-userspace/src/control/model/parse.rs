//! Reading and validating Services and EndpointSlices as Kubernetes validation would: the
//! valid views the translation works on, or a refusal with its reason. Pure: no I/O, and no
//! translation (which frontends and backends a Service gives is `model`'s).
use std::{
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ModelOptions;
use crate::control::{
    invalid::{Invalid, reason},
    state::Proto,
    store::{
        ObjectKey, StoredEndpointSlice, StoredService,
        compact::{IpText, Labels, StoredServicePort, StoredServiceSpec},
    },
};

/// Why an object (or port) is refused.
pub(super) struct Refusal {
    pub(super) reason: &'static str,
    pub(super) detail: String,
}

impl Refusal {
    pub(super) fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The record of a refusal, logged once as it is made.
pub(super) fn refuse(kind: &'static str, key: &ObjectKey, refusal: Refusal) -> Invalid {
    tracing::warn!(
        kind,
        object = %key,
        reason = refusal.reason,
        detail = refusal.detail,
        "skipping invalid object"
    );
    Invalid {
        kind,
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        reason: refusal.reason,
        detail: refusal.detail,
    }
}

/// A Service as the model uses it, validated.
pub(super) struct ValidService<'a> {
    pub(super) key: &'a ObjectKey,
    pub(super) type_: ServiceType,
    pub(super) cluster_ip: Ipv4Addr,
    pub(super) external_ips: Vec<Ipv4Addr>,
    pub(super) ingress_ips: Vec<Ipv4Addr>,
    pub(super) external_local: bool,
    pub(super) internal_local: bool,
    pub(super) publish_not_ready: bool,
    /// `sessionAffinity: ClientIP` timeout; 0 = none.
    pub(super) affinity_timeout_s: u32,
    pub(super) ports: Vec<ValidPort<'a>>,
}

/// `spec.type`, of the Services that are programmed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

pub(super) struct ValidPort<'a> {
    pub(super) name: &'a str,
    pub(super) proto: Proto,
    pub(super) port: u16,
    pub(super) node_port: Option<u16>,
}

/// An EndpointSlice as the model uses it, validated.
pub(super) struct ValidSlice<'a> {
    pub(super) ports: Vec<SlicePort<'a>>,
    pub(super) endpoints: Vec<SliceEndpoint<'a>>,
}

pub(super) struct SlicePort<'a> {
    pub(super) name: &'a str,
    pub(super) proto: Proto,
    pub(super) port: u16,
}

pub(super) struct SliceEndpoint<'a> {
    pub(super) addr: Ipv4Addr,
    pub(super) node_name: Option<&'a str>,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
}

/// Why an object belongs to someone else (kube-proxy's informer label selector), if it does.
pub(super) fn not_ours(labels: &Labels, opts: &ModelOptions) -> Option<&'static str> {
    if labels.headless {
        return Some("labelled headless");
    }
    match labels.service_proxy_name.as_deref() {
        Some(name) if opts.service_proxy_name.as_deref() != Some(name) => {
            Some("labelled for another service proxy")
        }
        _ => None,
    }
}

pub(super) enum Parsed<'a> {
    /// Program it; the refusals are ports with an unsupported protocol, left out.
    Program(ValidService<'a>, Vec<Refusal>),
    /// Not programmed, and nothing wrong with it.
    Skip(&'static str),
}

pub(super) fn parse_service<'a>(
    key: &'a ObjectKey,
    service: &'a StoredService,
) -> Result<Parsed<'a>, Refusal> {
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
    let cluster_ips: Vec<&IpText> = if spec.cluster_ips.is_empty() {
        spec.cluster_ip
            .iter()
            .filter(|ip| !matches!(ip, IpText::Other(text) if text.is_empty()))
            .collect()
    } else {
        spec.cluster_ips.iter().collect()
    };
    match cluster_ips.first() {
        None => {
            return Err(Refusal::new(
                reason::MISSING_CLUSTER_IP,
                "no spec.clusterIP",
            ));
        }
        Some(IpText::Other(text)) if &**text == "None" => {
            return Ok(Parsed::Skip("headless (clusterIP None)"));
        }
        Some(_) => {}
    }
    let Some(cluster_ip) = first_ipv4(cluster_ips, "clusterIP")? else {
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
    let external_ips = ipv4s(&spec.external_ips, "externalIP")?;

    let mut ingress = Vec::new();
    if type_ == ServiceType::LoadBalancer {
        for entry in &service.ingress {
            let Some(ip) = entry
                .ip
                .as_ref()
                .filter(|ip| !matches!(ip, IpText::Other(text) if text.is_empty()))
            else {
                continue; // hostname-only ingress: nothing to capture
            };
            // ipMode Proxy: the load balancer proxies, so traffic must really go to it.
            if matches!(entry.ip_mode.as_deref(), None | Some("VIP")) {
                ingress.push(ip.clone());
            }
        }
    }
    let ingress_ips = ipv4s(&ingress, "load balancer ingress IP")?;

    let affinity_timeout_s = session_affinity(spec)?;
    let (ports, unsupported) = parse_service_ports(&spec.ports)?;
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
            affinity_timeout_s,
            ports,
        },
        unsupported,
    ))
}

/// `spec.sessionAffinity` and its timeout, as kube-proxy reads them: `ClientIP` keeps a client
/// on one endpoint for `timeoutSeconds` (default 10800, at most 86400) after its last new
/// connection; `None` or unset, no affinity.
pub(super) fn session_affinity(spec: &StoredServiceSpec) -> Result<u32, Refusal> {
    const DEFAULT_TIMEOUT_S: i32 = 10_800;
    const MAX_TIMEOUT_S: i32 = 86_400;
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(0),
        Some("ClientIP") => {
            let t = spec.affinity_timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
            match u32::try_from(t) {
                Ok(t) if t > 0 && t <= MAX_TIMEOUT_S as u32 => Ok(t),
                _ => Err(Refusal::new(
                    reason::BAD_FIELD,
                    format!("sessionAffinityConfig.clientIP.timeoutSeconds {t} (1..=86400)"),
                )),
            }
        }
        Some(other) => Err(Refusal::new(
            reason::BAD_FIELD,
            format!("sessionAffinity {other:?}"),
        )),
    }
}

pub(super) fn parse_service_ports(
    ports: &[StoredServicePort],
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

pub(super) fn parse_slice<'a>(
    slice: &'a StoredEndpointSlice,
    opts: &ModelOptions,
) -> Result<ValidSlice<'a>, Refusal> {
    let listed = &slice.endpoints;
    if listed.len() > opts.max_endpoints_per_slice {
        let detail = format!(
            "{} endpoints, more than the maximum of {}",
            listed.len(),
            opts.max_endpoints_per_slice
        );
        return Err(Refusal::new(reason::TOO_MANY_ENDPOINTS, detail));
    }
    let mut ports: Vec<SlicePort<'a>> = Vec::new();
    for p in &slice.ports {
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
        let addr = match &endpoint.address {
            Some(IpText::V4(addr)) => *addr,
            Some(IpText::Other(a)) => {
                let detail = format!("endpoint address {a:?} is not IPv4");
                return Err(Refusal::new(reason::BAD_IP, detail));
            }
            None => return Err(Refusal::new(reason::BAD_IP, "endpoint without addresses")),
        };
        endpoints.push(SliceEndpoint {
            addr,
            node_name: endpoint.node_name.as_deref(),
            ready: endpoint.ready.unwrap_or(true),
            serving: endpoint.serving.unwrap_or(true),
            terminating: endpoint.terminating.unwrap_or(false),
        });
    }
    Ok(ValidSlice { ports, endpoints })
}

pub(super) fn traffic_policy(policy: Option<&str>, field: &str) -> Result<bool, Refusal> {
    match policy {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(Refusal::new(
            reason::BAD_FIELD,
            format!("{field} {other:?}"),
        )),
    }
}

pub(super) fn parse_proto(protocol: &str) -> Option<Proto> {
    match protocol {
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        _ => None,
    }
}

pub(super) fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// The first IPv4 address of `ips`; every entry must parse.
pub(super) fn first_ipv4(ips: Vec<&IpText>, field: &str) -> Result<Option<Ipv4Addr>, Refusal> {
    let mut first = None;
    for ip in ips {
        if let Some(v4) = ipv4(ip, field)? {
            first.get_or_insert(v4);
        }
    }
    Ok(first)
}

/// The IPv4 addresses of `ips` without duplicates; every entry must parse.
pub(super) fn ipv4s(ips: &[IpText], field: &str) -> Result<Vec<Ipv4Addr>, Refusal> {
    let mut v4 = Vec::new();
    for ip in ips {
        v4.extend(ipv4(ip, field)?);
    }
    Ok(dedup(v4))
}

/// The address if it is IPv4, None if it is IPv6, a refusal if it is neither.
pub(super) fn ipv4(ip: &IpText, field: &str) -> Result<Option<Ipv4Addr>, Refusal> {
    match ip {
        IpText::V4(v4) => Ok(Some(*v4)),
        IpText::Other(text) => match IpAddr::from_str(text) {
            Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
            Ok(IpAddr::V6(_)) => Ok(None),
            Err(_) => Err(Refusal::new(reason::BAD_IP, format!("{field} {text:?}"))),
        },
    }
}

/// `items` without repeats, first occurrence kept.
pub(super) fn dedup(items: impl IntoIterator<Item = Ipv4Addr>) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}
