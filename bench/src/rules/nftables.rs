//! kube-proxy's nftables mode as an `nft -f` script: table `ip kube-proxy` with the
//! `service-ips` (address . protocol . port) and `service-nodeports` (protocol . port) verdict
//! maps that the `services` chain dispatches through, a `service-*` chain per service port
//! choosing an `endpoint-*` chain with `numgen random mod N vmap`, `external-*` chains for
//! NodePorts, the `mark-for-masquerade` / `masquerading` pair, and the filter chains that
//! reject or drop traffic to ports without endpoints. Rule text follows the shapes the
//! proxier documents. The map and set elements of all ports are added at the end, one
//! statement per map (the same transaction's content; nft 1.0.6 parses one statement per
//! element several times slower at 10,000 Services).
use std::fmt::Write as _;

use super::{ClusterNet, Endpoint, MASQ_MARK, ServicePort, chain_tag};

const T: &str = "ip kube-proxy";

fn service_chain(sp: &ServicePort, kind: &str) -> String {
    let tag = chain_tag(&[&sp.display(), sp.proto.name()]);
    format!("{kind}-{}-{}", &tag[..8], path(sp))
}

/// `namespace/name/proto/port`, the readable part of kube-proxy's chain names.
fn path(sp: &ServicePort) -> String {
    let port = if sp.port_name.is_empty() {
        sp.port.to_string()
    } else {
        sp.port_name.clone()
    };
    format!("{}/{}/{}/{port}", sp.namespace, sp.name, sp.proto.name())
}

fn endpoint_chain(sp: &ServicePort, e: Endpoint) -> String {
    let ep = format!("{}/{}", e.addr, e.port);
    let tag = chain_tag(&[&sp.display(), sp.proto.name(), &ep]);
    format!("endpoint-{}-{}__{ep}", &tag[..8], path(sp))
}

fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
    out.push('\n');
}

/// Elements of the sets and verdict maps, by map, in the order they were added.
#[derive(Default)]
struct Elements {
    maps: Vec<(&'static str, Vec<String>)>,
}

impl Elements {
    fn add(&mut self, map: &'static str, element: String) {
        match self.maps.iter_mut().find(|(m, _)| *m == map) {
            Some((_, v)) => v.push(element),
            None => self.maps.push((map, vec![element])),
        }
    }

    fn write(&self, out: &mut String) {
        for (map, elements) in &self.maps {
            line(
                out,
                format_args!("add element {T} {map} {{ {} }}", elements.join(" , ")),
            );
        }
    }
}

/// The `nft -f` script for `ports`.
#[must_use]
pub fn ruleset(ports: &[ServicePort], net: &ClusterNet) -> String {
    let mut out = String::new();
    let mut elements = Elements::default();
    base(&mut out, net);
    for sp in ports {
        out.push('\n');
        service_port(&mut out, &mut elements, sp, net);
    }
    out.push('\n');
    elements.write(&mut out);
    out
}

fn base(out: &mut String, net: &ClusterNet) {
    let o = out;
    line(
        o,
        format_args!("add table {T} {{ comment \"rules for kube-proxy\" ; }}"),
    );
    line(
        o,
        format_args!(
            "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
        ),
    );
    line(
        o,
        format_args!(
            "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
        ),
    );
    line(
        o,
        format_args!(
            "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        ),
    );
    line(
        o,
        format_args!(
            "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
        ),
    );
    line(
        o,
        format_args!(
            "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
        ),
    );
    line(
        o,
        format_args!(
            "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
        ),
    );
    line(
        o,
        format_args!(
            "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
        ),
    );
    for chain in [
        "cluster-ips-check",
        "filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
        "filter-output-pre-dnat { type filter hook output priority -110 ; }",
        "filter-forward { type filter hook forward priority 0 ; }",
        "filter-input { type filter hook input priority 0 ; }",
        "filter-output { type filter hook output priority 0 ; }",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nat-output { type nat hook output priority -100 ; }",
        "nat-postrouting { type nat hook postrouting priority 100 ; }",
        "nat-prerouting { type nat hook prerouting priority -100 ; }",
        "nodeport-endpoints-check",
        "reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "services",
        "service-endpoints-check",
    ] {
        line(o, format_args!("add chain {T} {chain}"));
    }
    let cidr = net.service_cidr;
    for rule in [
        "cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"".to_owned(),
        format!("cluster-ips-check ip daddr {{ {cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        "filter-prerouting-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-forward ct state new jump service-endpoints-check".to_owned(),
        "filter-forward ct state new jump cluster-ips-check".to_owned(),
        "filter-input ct state new jump nodeport-endpoints-check".to_owned(),
        "filter-input ct state new jump service-endpoints-check".to_owned(),
        "filter-output ct state new jump service-endpoints-check".to_owned(),
        "filter-output-pre-dnat ct state new jump firewall-check".to_owned(),
        "filter-output ct state new jump cluster-ips-check".to_owned(),
        "firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips".to_owned(),
        format!("mark-for-masquerade mark set mark or {MASQ_MARK}"),
        format!("masquerading mark and {MASQ_MARK} == 0 return"),
        format!("masquerading mark set mark xor {MASQ_MARK}"),
        "masquerading masquerade fully-random".to_owned(),
        "nat-output jump services".to_owned(),
        "nat-postrouting jump masquerading".to_owned(),
        "nat-prerouting jump services".to_owned(),
        "nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports".to_owned(),
        "reject-chain reject".to_owned(),
        "services ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
        "services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".to_owned(),
        "service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned(),
    ] {
        line(o, format_args!("add rule {T} {rule}"));
    }
    for ip in &net.node_ips {
        line(o, format_args!("add element {T} nodeport-ips {{ {ip} }}"));
    }
}

/// `numgen random mod N vmap { 0 : goto endpoint-a , 1 : goto endpoint-b }`.
fn choose(sp: &ServicePort, endpoints: &[Endpoint]) -> String {
    let arms: Vec<String> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{i} : goto {}", endpoint_chain(sp, *e)))
        .collect();
    format!(
        "numgen random mod {} vmap {{ {} }}",
        endpoints.len(),
        arms.join(" , ")
    )
}

fn service_port(o: &mut String, el: &mut Elements, sp: &ServicePort, net: &ClusterNet) {
    let (p, port, cip) = (sp.proto.name(), sp.port, sp.cluster_ip);
    let shown = sp.display();
    line(o, format_args!("# {shown}"));
    el.add("cluster-ips", cip.to_string());
    if sp.endpoints.is_empty() {
        el.add(
            "no-endpoint-services",
            format!("{cip} . {p} . {port} comment \"{shown}\" : goto reject-chain"),
        );
        if let Some(np) = sp.node_port {
            el.add(
                "no-endpoint-nodeports",
                format!("{p} . {np} comment \"{shown}\" : goto reject-chain"),
            );
        }
        return;
    }
    // Chains first: a rule may only jump to a chain that exists.
    let svc = service_chain(sp, "service");
    line(o, format_args!("add chain {T} {svc}"));
    if sp.node_port.is_some() && !sp.external_endpoints().is_empty() {
        line(
            o,
            format_args!("add chain {T} {}", service_chain(sp, "external")),
        );
    }
    for e in &sp.endpoints {
        line(o, format_args!("add chain {T} {}", endpoint_chain(sp, *e)));
    }
    line(
        o,
        format_args!(
            "add rule {T} {svc} ip daddr {cip} {p} dport {port} ip saddr != {} jump mark-for-masquerade",
            net.pod_cidr
        ),
    );
    line(
        o,
        format_args!("add rule {T} {svc} {}", choose(sp, &sp.endpoints)),
    );
    if let Some(np) = sp.node_port {
        external(o, el, sp, net, &svc, np);
    }
    for e in &sp.endpoints {
        let ep = endpoint_chain(sp, *e);
        line(
            o,
            format_args!(
                "add rule {T} {ep} ip saddr {} jump mark-for-masquerade",
                e.addr
            ),
        );
        line(
            o,
            format_args!(
                "add rule {T} {ep} meta l4proto {p} dnat to {}:{}",
                e.addr, e.port
            ),
        );
    }
    el.add("service-ips", format!("{cip} . {p} . {port} : goto {svc}"));
}

fn external(
    o: &mut String,
    el: &mut Elements,
    sp: &ServicePort,
    net: &ClusterNet,
    svc: &str,
    node_port: u16,
) {
    let (p, shown) = (sp.proto.name(), sp.display());
    let local = sp.external_endpoints();
    if local.is_empty() {
        el.add(
            "no-endpoint-nodeports",
            format!("{p} . {node_port} comment \"{shown}\" : drop"),
        );
        return;
    }
    let ext = service_chain(sp, "external");
    if sp.external_local {
        line(
            o,
            format_args!(
                "add rule {T} {ext} ip saddr {} goto {svc} comment \"short-circuit pod traffic\"",
                net.pod_cidr
            ),
        );
        line(
            o,
            format_args!(
                "add rule {T} {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
            ),
        );
        line(
            o,
            format_args!(
                "add rule {T} {ext} fib saddr type local goto {svc} comment \"short-circuit local traffic\""
            ),
        );
        line(o, format_args!("add rule {T} {ext} {}", choose(sp, &local)));
    } else {
        line(
            o,
            format_args!("add rule {T} {ext} jump mark-for-masquerade"),
        );
        line(o, format_args!("add rule {T} {ext} goto {svc}"));
    }
    el.add(
        "service-nodeports",
        format!("{p} . {node_port} : goto {ext}"),
    );
}

#[cfg(test)]
mod tests {
    use super::ruleset;
    use crate::rules::fixtures::{filler, measured, net};

    const BASE: &str = r#"add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 10.96.0.0/12 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add element ip kube-proxy nodeport-ips { 192.168.50.11 }
"#;

    const MEASURED: &str = r#"
# bench/measured:udp
add chain ip kube-proxy service-EWS2BUU3-bench/measured/udp/udp
add chain ip kube-proxy external-EWS2BUU3-bench/measured/udp/udp
add chain ip kube-proxy endpoint-4TL3WFUG-bench/measured/udp/udp__10.244.1.5/9000
add chain ip kube-proxy endpoint-DDJYCBVB-bench/measured/udp/udp__10.244.1.6/9000
add rule ip kube-proxy service-EWS2BUU3-bench/measured/udp/udp ip daddr 10.96.0.10 udp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-EWS2BUU3-bench/measured/udp/udp numgen random mod 2 vmap { 0 : goto endpoint-4TL3WFUG-bench/measured/udp/udp__10.244.1.5/9000 , 1 : goto endpoint-DDJYCBVB-bench/measured/udp/udp__10.244.1.6/9000 }
add rule ip kube-proxy external-EWS2BUU3-bench/measured/udp/udp ip saddr 10.244.0.0/16 goto service-EWS2BUU3-bench/measured/udp/udp comment "short-circuit pod traffic"
add rule ip kube-proxy external-EWS2BUU3-bench/measured/udp/udp fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip kube-proxy external-EWS2BUU3-bench/measured/udp/udp fib saddr type local goto service-EWS2BUU3-bench/measured/udp/udp comment "short-circuit local traffic"
add rule ip kube-proxy external-EWS2BUU3-bench/measured/udp/udp numgen random mod 2 vmap { 0 : goto endpoint-4TL3WFUG-bench/measured/udp/udp__10.244.1.5/9000 , 1 : goto endpoint-DDJYCBVB-bench/measured/udp/udp__10.244.1.6/9000 }
add rule ip kube-proxy endpoint-4TL3WFUG-bench/measured/udp/udp__10.244.1.5/9000 ip saddr 10.244.1.5 jump mark-for-masquerade
add rule ip kube-proxy endpoint-4TL3WFUG-bench/measured/udp/udp__10.244.1.5/9000 meta l4proto udp dnat to 10.244.1.5:9000
add rule ip kube-proxy endpoint-DDJYCBVB-bench/measured/udp/udp__10.244.1.6/9000 ip saddr 10.244.1.6 jump mark-for-masquerade
add rule ip kube-proxy endpoint-DDJYCBVB-bench/measured/udp/udp__10.244.1.6/9000 meta l4proto udp dnat to 10.244.1.6:9000
"#;

    const SVC: &str = "service-EWS2BUU3-bench/measured/udp/udp";
    const EXT: &str = "external-EWS2BUU3-bench/measured/udp/udp";

    #[test]
    fn one_nodeport_service_with_local_policy() {
        let got = ruleset(&[measured()], &net());
        let elements = format!(
            "\nadd element ip kube-proxy cluster-ips {{ 10.96.0.10 }}\n\
             add element ip kube-proxy service-nodeports {{ udp . 32510 : goto {EXT} }}\n\
             add element ip kube-proxy service-ips {{ 10.96.0.10 . udp . 80 : goto {SVC} }}\n"
        );
        assert_eq!(
            got,
            format!("{BASE}{MEASURED}{elements}"),
            "\n--- got ---\n{got}"
        );
    }

    #[test]
    fn two_services_in_order() {
        let got = ruleset(&[filler(), measured()], &net());
        let filler = r"
# bench/filler-1
add chain ip kube-proxy service-VITKWGFM-bench/filler-1/tcp/80
add chain ip kube-proxy endpoint-BBH2I5RZ-bench/filler-1/tcp/80__10.244.2.7/8080
add rule ip kube-proxy service-VITKWGFM-bench/filler-1/tcp/80 ip daddr 10.96.0.11 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
add rule ip kube-proxy service-VITKWGFM-bench/filler-1/tcp/80 numgen random mod 1 vmap { 0 : goto endpoint-BBH2I5RZ-bench/filler-1/tcp/80__10.244.2.7/8080 }
add rule ip kube-proxy endpoint-BBH2I5RZ-bench/filler-1/tcp/80__10.244.2.7/8080 ip saddr 10.244.2.7 jump mark-for-masquerade
add rule ip kube-proxy endpoint-BBH2I5RZ-bench/filler-1/tcp/80__10.244.2.7/8080 meta l4proto tcp dnat to 10.244.2.7:8080
";
        let elements = format!(
            "\nadd element ip kube-proxy cluster-ips {{ 10.96.0.11 , 10.96.0.10 }}\n\
             add element ip kube-proxy service-ips {{ 10.96.0.11 . tcp . 80 : goto service-VITKWGFM-bench/filler-1/tcp/80 , 10.96.0.10 . udp . 80 : goto {SVC} }}\n\
             add element ip kube-proxy service-nodeports {{ udp . 32510 : goto {EXT} }}\n"
        );
        assert_eq!(
            got,
            format!("{BASE}{filler}{MEASURED}{elements}"),
            "\n--- got ---\n{got}"
        );
    }

    #[test]
    fn a_port_without_endpoints_goes_to_the_reject_chain() {
        let mut empty = filler();
        empty.endpoints.clear();
        let got = ruleset(&[empty], &net());
        assert!(got.ends_with(
            "add element ip kube-proxy cluster-ips { 10.96.0.11 }\n\
             add element ip kube-proxy no-endpoint-services { 10.96.0.11 . tcp . 80 comment \"bench/filler-1\" : goto reject-chain }\n"
        ), "{got}");
    }
}
