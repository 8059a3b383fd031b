//! kube-proxy's iptables mode as an `iptables-restore` file: the filter table's service
//! chains (KUBE-FORWARD, KUBE-SERVICES rejects, KUBE-EXTERNAL-SERVICES, KUBE-NODEPORTS,
//! KUBE-PROXY-FIREWALL) and the nat table's KUBE-SERVICES → KUBE-SVC-* (`statistic --mode
//! random --probability`) → KUBE-SEP-* DNAT, KUBE-NODEPORTS → KUBE-EXT-* (KUBE-SVL-* for
//! externalTrafficPolicy Local), KUBE-MARK-MASQ and KUBE-POSTROUTING's masquerade. Rule text
//! follows the shapes the proxier documents (comments included: iptables matches them too,
//! so they cost what they cost kube-proxy). A full file for a fresh namespace: built-in
//! chains are declared and jump to kube-proxy's, as kube-proxy's own setup does.
use std::fmt::Write as _;

use super::{ClusterNet, MASQ_MARK, ServicePort, chain_tag, probability};

/// Chain names of one service port.
struct Names {
    svc: String,
    ext: String,
    svl: String,
}

impl Names {
    fn of(sp: &ServicePort) -> Self {
        let tag = chain_tag(&[&sp.display(), sp.proto.name()]);
        Self {
            svc: format!("KUBE-SVC-{tag}"),
            ext: format!("KUBE-EXT-{tag}"),
            svl: format!("KUBE-SVL-{tag}"),
        }
    }
}

fn sep_chain(sp: &ServicePort, e: super::Endpoint) -> String {
    let ep = format!("{}:{}", e.addr, e.port);
    format!(
        "KUBE-SEP-{}",
        chain_tag(&[&sp.display(), sp.proto.name(), &ep])
    )
}

/// A table being written: its chain declarations and its rules, in order.
#[derive(Default)]
struct Table {
    chains: Vec<String>,
    rules: String,
}

impl Table {
    fn chain(&mut self, name: &str) {
        self.chains.push(name.to_owned());
    }

    fn rule(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = self.rules.write_fmt(args);
        self.rules.push('\n');
    }

    fn write(&self, out: &mut String, name: &str, builtin: &[&str]) {
        let _ = writeln!(out, "*{name}");
        for b in builtin {
            let _ = writeln!(out, ":{b} ACCEPT [0:0]");
        }
        for c in &self.chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        out.push_str(&self.rules);
        out.push_str("COMMIT\n");
    }
}

/// The `iptables-restore` input for `ports` (in kube-proxy's rule order: the order given).
#[must_use]
pub fn restore(ports: &[ServicePort], net: &ClusterNet) -> String {
    let mut filter = Table::default();
    let mut nat = Table::default();
    base_filter(&mut filter);
    base_nat(&mut nat);
    // Per-port chains are declared after the base ones, in the order the ports come.
    let mut nodeport_rules = Table::default();
    for sp in ports {
        service_port(sp, net, &mut filter, &mut nat, &mut nodeport_rules);
    }
    nat.rules.push_str(&nodeport_rules.rules);
    nat.rule(format_args!(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    ));
    let mut out = String::new();
    filter.write(&mut out, "filter", &["INPUT", "FORWARD", "OUTPUT"]);
    nat.write(
        &mut out,
        "nat",
        &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    );
    out
}

fn base_filter(t: &mut Table) {
    for c in [
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SERVICES",
    ] {
        t.chain(c);
    }
    let new = "-m conntrack --ctstate NEW";
    t.rule(format_args!(
        "-A INPUT {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
    ));
    t.rule(format_args!(
        "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"
    ));
    t.rule(format_args!(
        "-A INPUT {new} -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"
    ));
    t.rule(format_args!(
        "-A FORWARD {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
    ));
    t.rule(format_args!(
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"
    ));
    t.rule(format_args!(
        "-A FORWARD {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    ));
    t.rule(format_args!(
        "-A FORWARD {new} -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"
    ));
    t.rule(format_args!(
        "-A OUTPUT {new} -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"
    ));
    t.rule(format_args!(
        "-A OUTPUT {new} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    ));
    t.rule(format_args!(
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    ));
    t.rule(format_args!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    ));
    t.rule(format_args!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
}

fn base_nat(t: &mut Table) {
    for c in [
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-SERVICES",
    ] {
        t.chain(c);
    }
    t.rule(format_args!(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    ));
    t.rule(format_args!(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    ));
    t.rule(format_args!(
        "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"
    ));
    t.rule(format_args!(
        "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"
    ));
    t.rule(format_args!(
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    ));
    t.rule(format_args!(
        "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
    ));
    t.rule(format_args!(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    ));
}

fn service_port(
    sp: &ServicePort,
    net: &ClusterNet,
    filter: &mut Table,
    nat: &mut Table,
    nodeports: &mut Table,
) {
    let names = Names::of(sp);
    let (p, shown) = (sp.proto.name(), sp.display());
    let (cip, port) = (sp.cluster_ip, sp.port);
    if sp.endpoints.is_empty() {
        filter.rule(format_args!(
            "-A KUBE-SERVICES -d {cip}/32 -p {p} -m comment --comment \"{shown} has no endpoints\" -m {p} --dport {port} -j REJECT --reject-with icmp-port-unreachable"
        ));
        if let Some(np) = sp.node_port {
            filter.rule(format_args!(
                "-A KUBE-EXTERNAL-SERVICES -p {p} -m comment --comment \"{shown} has no endpoints\" -m addrtype --dst-type LOCAL -m {p} --dport {np} -j REJECT --reject-with icmp-port-unreachable"
            ));
        }
        return;
    }
    nat.chain(&names.svc);
    nat.rule(format_args!(
        "-A KUBE-SERVICES -d {cip}/32 -p {p} -m comment --comment \"{shown} cluster IP\" -m {p} --dport {port} -j {}",
        names.svc
    ));
    nat.rule(format_args!(
        "-A {} ! -s {} -d {cip}/32 -p {p} -m comment --comment \"{shown} cluster IP\" -m {p} --dport {port} -j KUBE-MARK-MASQ",
        names.svc, net.pod_cidr
    ));
    balance(nat, &names.svc, sp, &sp.endpoints);
    if let Some(np) = sp.node_port {
        external(sp, net, &names, np, filter, nat, nodeports);
    }
    for e in &sp.endpoints {
        let sep = sep_chain(sp, *e);
        nat.chain(&sep);
        nat.rule(format_args!(
            "-A {sep} -s {}/32 -m comment --comment \"{shown}\" -j KUBE-MARK-MASQ",
            e.addr
        ));
        nat.rule(format_args!(
            "-A {sep} -p {p} -m comment --comment \"{shown}\" -m {p} -j DNAT --to-destination {}:{}",
            e.addr, e.port
        ));
    }
}

/// The NodePort: KUBE-NODEPORTS → KUBE-EXT (→ KUBE-SVL for externalTrafficPolicy Local).
fn external(
    sp: &ServicePort,
    net: &ClusterNet,
    names: &Names,
    node_port: u16,
    filter: &mut Table,
    nat: &mut Table,
    nodeports: &mut Table,
) {
    let (p, shown) = (sp.proto.name(), sp.display());
    let (ext, svc, svl) = (&names.ext, &names.svc, &names.svl);
    let local = sp.external_endpoints();
    if local.is_empty() {
        filter.rule(format_args!(
            "-A KUBE-EXTERNAL-SERVICES -p {p} -m comment --comment \"{shown} has no local endpoints\" -m addrtype --dst-type LOCAL -m {p} --dport {node_port} -j DROP"
        ));
        return;
    }
    nat.chain(ext);
    nodeports.rule(format_args!(
        "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{shown}\" -m {p} --dport {node_port} -j {ext}"
    ));
    if sp.external_local {
        nat.chain(svl);
        nat.rule(format_args!(
            "-A {ext} -s {} -m comment --comment \"pod traffic for {shown} external destinations\" -j {svc}",
            net.pod_cidr
        ));
        nat.rule(format_args!(
            "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {shown} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
        ));
        nat.rule(format_args!(
            "-A {ext} -m comment --comment \"route LOCAL traffic for {shown} external destinations\" -m addrtype --src-type LOCAL -j {svc}"
        ));
        nat.rule(format_args!("-A {ext} -j {svl}"));
        balance(nat, svl, sp, &local);
    } else {
        nat.rule(format_args!(
            "-A {ext} -m comment --comment \"masquerade traffic for {shown} external destinations\" -j KUBE-MARK-MASQ"
        ));
        nat.rule(format_args!("-A {ext} -j {svc}"));
    }
}

/// One `statistic` rule per endpoint, the last one unconditional.
fn balance(nat: &mut Table, chain: &str, sp: &ServicePort, endpoints: &[super::Endpoint]) {
    let shown = sp.display();
    let n = endpoints.len();
    for (i, e) in endpoints.iter().enumerate() {
        let sep = sep_chain(sp, *e);
        let to = format!("{}:{}", e.addr, e.port);
        if i + 1 < n {
            nat.rule(format_args!(
                "-A {chain} -m comment --comment \"{shown} -> {to}\" -m statistic --mode random --probability {} -j {sep}",
                probability(i, n)
            ));
        } else {
            nat.rule(format_args!(
                "-A {chain} -m comment --comment \"{shown} -> {to}\" -j {sep}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::restore;
    use crate::rules::fixtures::{filler, measured, net};

    const BASE_FILTER: &str = r#"*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SERVICES - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A INPUT -m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"#;

    const NAT_HEAD: &str = r"*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
";

    const NAT_BASE_RULES: &str = r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
"#;

    const LAST: &str = "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n";

    /// The measured service alone: ClusterIP and NodePort (eTP Local) over two local pods.
    const MEASURED_CHAINS: &str = r":KUBE-SVC-EWS2BUU34RPKV57S - [0:0]
:KUBE-EXT-EWS2BUU34RPKV57S - [0:0]
:KUBE-SVL-EWS2BUU34RPKV57S - [0:0]
:KUBE-SEP-7Q2QN7L5TDXXHY7E - [0:0]
:KUBE-SEP-YBYW5VKLNYQ2VL2O - [0:0]
";

    const MEASURED_RULES: &str = r#"-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "bench/measured:udp cluster IP" -m udp --dport 80 -j KUBE-SVC-EWS2BUU34RPKV57S
-A KUBE-SVC-EWS2BUU34RPKV57S ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p udp -m comment --comment "bench/measured:udp cluster IP" -m udp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-EWS2BUU34RPKV57S -m comment --comment "bench/measured:udp -> 10.244.1.5:9000" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-7Q2QN7L5TDXXHY7E
-A KUBE-SVC-EWS2BUU34RPKV57S -m comment --comment "bench/measured:udp -> 10.244.1.6:9000" -j KUBE-SEP-YBYW5VKLNYQ2VL2O
-A KUBE-EXT-EWS2BUU34RPKV57S -s 10.244.0.0/16 -m comment --comment "pod traffic for bench/measured:udp external destinations" -j KUBE-SVC-EWS2BUU34RPKV57S
-A KUBE-EXT-EWS2BUU34RPKV57S -m comment --comment "masquerade LOCAL traffic for bench/measured:udp external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-EWS2BUU34RPKV57S -m comment --comment "route LOCAL traffic for bench/measured:udp external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-EWS2BUU34RPKV57S
-A KUBE-EXT-EWS2BUU34RPKV57S -j KUBE-SVL-EWS2BUU34RPKV57S
-A KUBE-SVL-EWS2BUU34RPKV57S -m comment --comment "bench/measured:udp -> 10.244.1.5:9000" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-7Q2QN7L5TDXXHY7E
-A KUBE-SVL-EWS2BUU34RPKV57S -m comment --comment "bench/measured:udp -> 10.244.1.6:9000" -j KUBE-SEP-YBYW5VKLNYQ2VL2O
-A KUBE-SEP-7Q2QN7L5TDXXHY7E -s 10.244.1.5/32 -m comment --comment "bench/measured:udp" -j KUBE-MARK-MASQ
-A KUBE-SEP-7Q2QN7L5TDXXHY7E -p udp -m comment --comment "bench/measured:udp" -m udp -j DNAT --to-destination 10.244.1.5:9000
-A KUBE-SEP-YBYW5VKLNYQ2VL2O -s 10.244.1.6/32 -m comment --comment "bench/measured:udp" -j KUBE-MARK-MASQ
-A KUBE-SEP-YBYW5VKLNYQ2VL2O -p udp -m comment --comment "bench/measured:udp" -m udp -j DNAT --to-destination 10.244.1.6:9000
"#;

    const MEASURED_NODEPORT: &str = "-A KUBE-NODEPORTS -p udp -m comment --comment \"bench/measured:udp\" -m udp --dport 32510 -j KUBE-EXT-EWS2BUU34RPKV57S\n";

    #[test]
    fn one_nodeport_service_with_local_policy() {
        let got = restore(&[measured()], &net());
        let want = format!(
            "{BASE_FILTER}{NAT_HEAD}{MEASURED_CHAINS}{NAT_BASE_RULES}{MEASURED_RULES}{MEASURED_NODEPORT}{LAST}"
        );
        assert_eq!(got, want, "\n--- got ---\n{got}");
    }

    #[test]
    fn two_services_keep_their_order_and_nodeports_come_last() {
        let got = restore(&[filler(), measured()], &net());
        let filler_chains =
            ":KUBE-SVC-VITKWGFMH3WJPTDY - [0:0]\n:KUBE-SEP-KR7TLWEBVUMKZA5G - [0:0]\n";
        let filler_rules = r#"-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment "bench/filler-1 cluster IP" -m tcp --dport 80 -j KUBE-SVC-VITKWGFMH3WJPTDY
-A KUBE-SVC-VITKWGFMH3WJPTDY ! -s 10.244.0.0/16 -d 10.96.0.11/32 -p tcp -m comment --comment "bench/filler-1 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-VITKWGFMH3WJPTDY -m comment --comment "bench/filler-1 -> 10.244.2.7:8080" -j KUBE-SEP-KR7TLWEBVUMKZA5G
-A KUBE-SEP-KR7TLWEBVUMKZA5G -s 10.244.2.7/32 -m comment --comment "bench/filler-1" -j KUBE-MARK-MASQ
-A KUBE-SEP-KR7TLWEBVUMKZA5G -p tcp -m comment --comment "bench/filler-1" -m tcp -j DNAT --to-destination 10.244.2.7:8080
"#;
        let want = format!(
            "{BASE_FILTER}{NAT_HEAD}{filler_chains}{MEASURED_CHAINS}{NAT_BASE_RULES}{filler_rules}{MEASURED_RULES}{MEASURED_NODEPORT}{LAST}"
        );
        assert_eq!(got, want, "\n--- got ---\n{got}");
    }

    #[test]
    fn a_port_without_endpoints_is_rejected_in_the_filter_table() {
        let mut empty = filler();
        empty.endpoints.clear();
        let got = restore(&[empty], &net());
        assert!(got.contains(
            "-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment \"bench/filler-1 has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable\nCOMMIT\n*nat"
        ), "{got}");
        assert!(!got.contains("KUBE-SVC-"), "{got}");
    }
}
