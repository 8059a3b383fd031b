//! The model's tests: Kubernetes semantics from manifests to desired state, and the
//! incremental translator against `desired` (property tests).
use std::path::Path;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;

use super::*;
use crate::control::{source::manifests, store::StoredKind as _};

/// The objects of a YAML manifest, put in a store.
fn store(yaml: &str) -> Store {
    let mut store = Store::new();
    for object in objects(yaml) {
        object.apply(&mut store);
    }
    store
}

/// One object of a test manifest.
#[derive(Clone, Debug)]
enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    fn apply(self, store: &mut Store) {
        let applied = match self {
            Self::Service(o) => store.apply(*o).map(drop),
            Self::EndpointSlice(o) => store.apply(*o).map(drop),
            Self::Node(o) => store.apply(*o).map(drop),
        };
        applied.expect("test objects are named");
    }

    fn delete(&self, store: &mut Store) {
        match self {
            Self::Service(o) => drop(store.delete::<Service>(&o.key().expect("named"))),
            Self::EndpointSlice(o) => {
                drop(store.delete::<EndpointSlice>(&o.key().expect("named")));
            }
            Self::Node(o) => drop(store.delete::<Node>(&o.key().expect("named"))),
        }
    }
}

/// The objects of a YAML manifest, in order.
fn objects(yaml: &str) -> Vec<Object> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| {
            let value = serde_yaml::Value::deserialize(document).expect("test YAML parses");
            let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
            match kind.unwrap_or_default() {
                "Service" => Object::Service(serde_yaml::from_value(value).expect("Service")),
                "EndpointSlice" => {
                    Object::EndpointSlice(serde_yaml::from_value(value).expect("EndpointSlice"))
                }
                "Node" => Object::Node(serde_yaml::from_value(value).expect("Node")),
                other => panic!("test YAML holds a {other:?}"),
            }
        })
        .collect()
}

/// Builds the manifest's store object by object, then empties it again, updating a
/// [`Translator`] after each step: at every step its result must be [`desired`]'s and the
/// frontends it reports changed exactly those that changed.
fn incremental_matches_full(
    yaml: &str,
    node: &NodeInfo,
    opts: &ModelOptions,
) -> Result<(), String> {
    let objects = objects(yaml);
    let mut store = Store::new();
    let mut translator = Translator::new(opts.clone());
    let mut before = DesiredState::default();
    let steps = objects
        .iter()
        .map(|o| (true, o))
        .chain(objects.iter().map(|o| (false, o)));
    for (step, (add, object)) in steps.enumerate() {
        if add {
            object.clone().apply(&mut store);
        } else {
            object.delete(&mut store);
        }
        let changes = store.take_changes();
        let frontends = translator.update(&store, node, &changes);
        check_translator(&translator, &store, node, opts, &before, &frontends)
            .map_err(|e| format!("step {step}: {e}"))?;
        before = translator.state().clone();
    }
    Ok(())
}

/// The translator's result equals [`desired`], and `changed` names exactly the frontends
/// that differ from `before`.
fn check_translator(
    translator: &Translator,
    store: &Store,
    node: &NodeInfo,
    opts: &ModelOptions,
    before: &DesiredState,
    changed: &BTreeSet<FrontendAddr>,
) -> Result<(), String> {
    let full = desired(store, node, opts);
    let incremental = translator.desired();
    if incremental != full {
        return Err(format!(
            "the translator differs from desired():\n  incremental {:#?}\n  \
                 full {:#?}\n  invalid {:#?}\n  vs {:#?}",
            render(&incremental.state),
            render(&full.state),
            incremental.invalid,
            full.invalid
        ));
    }
    let differ: BTreeSet<FrontendAddr> = before
        .frontends
        .keys()
        .chain(full.state.frontends.keys())
        .filter(|a| before.frontends.get(a) != full.state.frontends.get(a))
        .copied()
        .collect();
    if *changed != differ {
        return Err(format!(
            "changed frontends {changed:?}, but these differ: {differ:?}"
        ));
    }
    Ok(())
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
            let affinity = match spec.affinity_timeout_s {
                0 => String::new(),
                t => format!(" affinity={t}s"),
            };
            format!(
                "{scope} {}:{}/{} {:?} {} {snat}{affinity} [{}]",
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
                name: "sessionAffinity ClientIP: kube-proxy's default timeout, 3 hours",
                yaml: concat!(web!(), "  sessionAffinity: ClientIP\n---\n", web_slice!()).into(),
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web snat affinity=10800s [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "sessionAffinity ClientIP with its timeout, on every frontend of the port",
                yaml: concat!(
                    web_node_port!(
                        "  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
"
                    ),
                    "---\n",
                    web_slice!()
                )
                .into(),
                frontends: &[
                    "both 10.96.0.1:80/TCP ClusterIp default/web snat affinity=60s [10.244.1.5:8080* 10.244.2.5:8080]",
                    "both 192.168.50.11:30080/TCP NodePort default/web snat affinity=60s [10.244.1.5:8080* 10.244.2.5:8080]",
                ],
                ..base()
            },
            Case {
                name: "sessionAffinity None is none; a bad value or timeout refuses the Service",
                yaml: concat!(
                    web!(),
                    "  sessionAffinity: None\n---\n",
                    web_slice!(),
                    "---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  clusterIP: 10.96.0.2
  sessionAffinity: Cookie
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: forever, namespace: default}
spec:
  clusterIP: 10.96.0.3
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}
  ports: [{port: 80}]
"
                )
                .into(),
                frontends: &[BOTH_WEB],
                invalid: &["Service default/forever bad_field", "Service default/sticky bad_field"],
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
    if let Err(e) = incremental_matches_full(&case.yaml, &node, &opts) {
        problems.push(format!("incremental: {e}"));
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

/// xorshift64*: deterministic randomness for the property test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    /// Each item with probability 1/`one_in`.
    fn some<T: Clone>(&mut self, items: &[T], one_in: usize) -> Vec<T> {
        items
            .iter()
            .filter(|_| self.chance(one_in))
            .cloned()
            .collect()
    }
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const SERVICES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
const SLICES: [&str; 6] = ["e0", "e1", "e2", "e3", "e4", "e5"];

/// Labels drawn so that some objects are not ours.
fn random_labels(rng: &mut Rng, labels: &mut serde_json::Map<String, serde_json::Value>) {
    match rng.below(14) {
        0 => drop(labels.insert(LABEL_HEADLESS.into(), "".into())),
        1 => drop(labels.insert(LABEL_SERVICE_PROXY_NAME.into(), "other".into())),
        2 => drop(labels.insert(LABEL_SERVICE_PROXY_NAME.into(), "xlb".into())),
        _ => {}
    }
}

/// A Service from small pools of names, addresses and ports, so that Services often
/// claim the same frontends and some are refused.
fn random_service(rng: &mut Rng) -> Service {
    use serde_json::json;
    let mut labels = serde_json::Map::new();
    random_labels(rng, &mut labels);
    let type_ = if rng.chance(30) {
        Some(rng.pick(&["ExternalName", "Magic"]))
    } else {
        rng.pick(&[
            None,
            Some("ClusterIP"),
            Some("NodePort"),
            Some("NodePort"),
            Some("LoadBalancer"),
        ])
    };
    let mut spec = json!({});
    if let Some(t) = type_ {
        spec["type"] = t.into();
    }
    let cluster_ip = if rng.chance(20) {
        rng.pick(&["None", "", "10.96.0.300", "fd00::1"])
    } else {
        rng.pick(&["10.96.0.1", "10.96.0.2", "10.96.0.3"])
    };
    spec["clusterIP"] = cluster_ip.into();
    if rng.chance(8) {
        spec["clusterIPs"] = json!(["fd00::1", rng.pick(&["10.96.0.2", "10.96.0.3"])]);
    }
    if rng.chance(3) {
        let pool = ["10.96.0.1", "198.51.100.1", "198.51.100.2", "192.168.50.11"];
        let mut ips = rng.some(&pool, 3);
        if rng.chance(40) {
            ips.push("198.51.100.x");
        }
        spec["externalIPs"] = json!(ips);
    }
    for field in ["externalTrafficPolicy", "internalTrafficPolicy"] {
        if let Some(p) = rng.pick(&[None, None, Some("Cluster"), Some("Local"), Some("Local")]) {
            spec[field] = p.into();
        }
    }
    if rng.chance(60) {
        spec["externalTrafficPolicy"] = "Sideways".into();
    }
    if rng.chance(5) {
        spec["publishNotReadyAddresses"] = true.into();
    }
    let mut ports = Vec::new();
    for _ in 0..=rng.below(2) {
        let mut port = json!({
            "port": rng.pick(&[80, 80, 81, 53]),
            "targetPort": rng.pick(&[json!(8080), json!("http")]),
        });
        if rng.chance(40) {
            port[rng.pick(&["port", "targetPort"])] = 0.into();
        }
        if let Some(name) = rng.pick(&[None, Some("http"), Some("dns")]) {
            port["name"] = name.into();
        }
        if let Some(p) = rng.pick(&[None, Some("TCP"), Some("UDP")]) {
            port["protocol"] = p.into();
        }
        if rng.chance(20) {
            port["protocol"] = "SCTP".into();
        }
        if let Some(n) = rng.pick(&[None, Some(30000), Some(30001), Some(80)]) {
            port["nodePort"] = n.into();
        }
        if rng.chance(40) {
            port["nodePort"] = 70000.into();
        }
        ports.push(port);
    }
    spec["ports"] = ports.into();
    let mut service = json!({
        "metadata": {
            "namespace": rng.pick(&NAMESPACES),
            "name": rng.pick(&SERVICES),
            "labels": labels,
        },
    });
    if !rng.chance(25) {
        service["spec"] = spec;
    }
    if rng.chance(2) {
        let ingress: Vec<serde_json::Value> = (0..rng.below(3))
            .map(|_| {
                let mut i = json!({"ip": rng.pick(&["198.51.100.1", "203.0.113.5", "", "x"])});
                if let Some(mode) = rng.pick(&[None, Some("VIP"), Some("Proxy")]) {
                    i["ipMode"] = mode.into();
                }
                i
            })
            .collect();
        service["status"] = json!({"loadBalancer": {"ingress": ingress}});
    }
    serde_json::from_value(service).expect("a Service")
}

fn random_slice(rng: &mut Rng) -> EndpointSlice {
    use serde_json::json;
    let mut labels = serde_json::Map::new();
    if !rng.chance(8) {
        labels.insert(LABEL_SERVICE_NAME.into(), rng.pick(&SERVICES).into());
    }
    random_labels(rng, &mut labels);
    let ports: Vec<serde_json::Value> = (0..=rng.below(2))
        .map(|_| {
            let mut port = json!({"protocol": rng.pick(&["TCP", "TCP", "UDP"])});
            if let Some(name) = rng.pick(&[None, Some("http"), Some("dns")]) {
                port["name"] = name.into();
            }
            if let Some(n) = rng.pick(&[Some(8080), Some(8080), Some(53), None]) {
                port["port"] = n.into();
            }
            if rng.chance(40) {
                port["port"] = 70000.into();
            }
            port
        })
        .collect();
    let endpoints: Vec<serde_json::Value> = (0..rng.below(5))
        .map(|_| {
            let address = if rng.chance(30) {
                "10.244.1.x".to_owned()
            } else {
                format!("10.244.1.{}", 1 + rng.below(6))
            };
            let mut e = json!({"addresses": [address]});
            if rng.chance(40) {
                e["addresses"] = json!([]);
            }
            if let Some(node) = rng.pick(&[None, Some("node-1"), Some("node-2")]) {
                e["nodeName"] = node.into();
            }
            let mut conditions = serde_json::Map::new();
            for c in ["ready", "serving", "terminating"] {
                if let Some(v) = rng.pick(&[None, Some(true), Some(false)]) {
                    conditions.insert(c.into(), v.into());
                }
            }
            e["conditions"] = conditions.into();
            e
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "namespace": rng.pick(&NAMESPACES),
            "name": rng.pick(&SLICES),
            "labels": labels,
        },
        "addressType": rng.pick(&["IPv4", "IPv4", "IPv4", "IPv4", "IPv6", "FQDN"]),
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("an EndpointSlice")
}

fn random_node(rng: &mut Rng) -> NodeInfo {
    let addresses = rng.pick(&[
        vec![Ipv4Addr::new(192, 168, 50, 11)],
        vec![
            Ipv4Addr::new(192, 168, 50, 11),
            Ipv4Addr::new(203, 0, 113, 5),
        ],
        vec![],
    ]);
    NodeInfo {
        name: rng.pick(&["node-1", "node-1", "node-2"]).to_owned(),
        addresses,
    }
}

fn random_key(rng: &mut Rng, names: &[&str]) -> ObjectKey {
    ObjectKey::new(rng.pick(&NAMESPACES), rng.pick(names))
}

/// Random sequences of store changes (objects applied and deleted one by one, re-lists,
/// whole-store replacements, a new node), with the translator updated after some of them:
/// after every update its result equals [`desired`] of the store, the frontends it reports
/// changed are exactly those that changed, and programming its changes incrementally gives
/// the same writes as a full plan of [`desired`].
#[test]
fn incremental_translation_equals_full_translation() {
    use crate::{control::programmer::Programmer, datapath::loader::Capacities};
    let caps = Capacities {
        frontends: 16,
        ..Capacities::small()
    };
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for run in 0..24 {
        let opts = if run % 3 == 2 {
            ModelOptions {
                service_proxy_name: Some("xlb".to_owned()),
                max_endpoints_per_slice: 3,
            }
        } else {
            ModelOptions::default()
        };
        let mut node = random_node(&mut rng);
        let mut store = Store::new();
        let mut translator = Translator::new(opts.clone());
        let mut before = DesiredState::default();
        let mut full_programmer = Programmer::new(&caps);
        let mut programmer = Programmer::new(&caps);
        for step in 0..150 {
            match rng.below(100) {
                0..35 => drop(store.apply(random_service(&mut rng)).expect("named")),
                35..70 => drop(store.apply(random_slice(&mut rng)).expect("named")),
                70..80 => drop(store.delete::<Service>(&random_key(&mut rng, &SERVICES))),
                80..90 => {
                    drop(store.delete::<EndpointSlice>(&random_key(&mut rng, &SLICES)));
                }
                90..93 => {
                    let services: Vec<Service> = (0..rng.below(8))
                        .map(|_| random_service(&mut rng))
                        .collect();
                    store.replace_all(services).expect("named");
                }
                93..96 => {
                    let slices: Vec<EndpointSlice> =
                        (0..rng.below(8)).map(|_| random_slice(&mut rng)).collect();
                    store.replace_all(slices).expect("named");
                }
                96..98 => {
                    let mut fresh = Store::new();
                    for _ in 0..rng.below(8) {
                        fresh.apply(random_service(&mut rng)).expect("named");
                        fresh.apply(random_slice(&mut rng)).expect("named");
                    }
                    store.assign(fresh);
                }
                _ => node = random_node(&mut rng),
            }
            if rng.chance(3) {
                continue; // let changes pile up
            }
            let changes = store.take_changes();
            let frontends = translator.update(&store, &node, &changes);
            check_translator(&translator, &store, &node, &opts, &before, &frontends)
                .unwrap_or_else(|e| panic!("run {run} step {step}: {e}"));
            before = translator.state().clone();

            let full_plan = full_programmer.plan(&desired(&store, &node, &opts).state);
            let plan = programmer.plan_changes(translator.state(), &frontends);
            assert_eq!(plan.ops, full_plan.ops, "run {run} step {step}: plan");
            assert_eq!(
                plan.failed, full_plan.failed,
                "run {run} step {step}: failed"
            );
        }
    }
}
