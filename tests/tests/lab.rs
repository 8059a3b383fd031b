//! Lab tests: xlb agents on nodes made of network namespaces, real sockets, the tomcat6 case
//! and its variations. Each test builds its own lab (names carry a per-run prefix) and tears
//! it down, also on failure.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    Netns,
    cluster::{CLIENT_IP, Cluster, EndpointStates},
    echo::{self, Answer, KeepAlive},
    tomcat6::{CLUSTER_IP, NODE_PORT, TARGET_PORT, Tomcat6, pod_name},
    veth,
};
use xlb_tests::privileged;

/// Per-request timeout: long enough for TCP to retransmit a lost SYN or segment (the machine
/// may be loaded by other tests), short enough to fail a broken path quickly.
const T: Duration = Duration::from_secs(5);
const SYNC: Duration = Duration::from_secs(10);

fn target_bin(name: &str) -> PathBuf {
    xlb_tests::workspace_bin(name)
}

/// The `xlb` binary built by `cargo xtask test`'s ebpf-build stage (or `XLB_BIN`).
fn xlb_bin() -> PathBuf {
    std::env::var_os("XLB_BIN").map_or_else(|| target_bin("xlb"), PathBuf::from)
}

fn echo_bin() -> PathBuf {
    target_bin("xlb-echo")
}

fn tomcat6(tag: &str, replicas: usize) -> Tomcat6 {
    let t = Tomcat6::start(tag, 3, replicas, &xlb_bin(), &echo_bin(), &[]).expect("lab");
    t.wait_ready(Duration::from_secs(20)).expect("agents ready");
    t
}

fn get(from: &Netns, addr: SocketAddrV4) -> Answer {
    match from.enter(|| echo::http_get(addr, T)).expect("netns") {
        Ok(a) => a,
        Err(e) => panic!("GET http://{addr}/ failed: {e}"),
    }
}

fn ip_of(a: &Answer) -> IpAddr {
    a.client.ip()
}

#[test]
fn datapath_attaches_to_nic_and_pod_interfaces() {
    if !privileged("datapath_attaches_to_nic_and_pod_interfaces") {
        return;
    }
    let lab = lb_lab::Lab::new("att").expect("lab");
    let node = lab.netns("node").expect("netns");
    veth(&node, "eth0", &node, "lxc0", true).expect("veth");
    let out = node
        .command(xlb_bin())
        .args(["datapath", "probe", "--nic", "eth0", "--pod-iface", "lxc0"])
        .output()
        .expect("running xlb");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("attached xlb_nic (XDP, driver mode) to eth0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("attached xlb_pod (tcx ingress) to lxc0"),
        "{stdout}"
    );
    let link = node.ip(["-d", "link", "show", "eth0"]).expect("ip link");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP left attached"
    );
}

/// NodePort through every node: every pod answers somewhere; a local backend sees the
/// client's address, a remote one the SNAT address of the node that forwarded (eTP=Cluster).
#[test]
fn nodeport_through_every_node_reaches_local_and_remote_pods() {
    if !privileged("nodeport_through_every_node_reaches_local_and_remote_pods") {
        return;
    }
    let t = tomcat6("np", 3);
    let c = &t.cluster;
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for (i, node) in c.nodes.iter().enumerate() {
        for _ in 0..12 {
            let a = get(&c.client, t.node_port(i));
            let pod = c.pod(&a.pod).expect("known pod");
            let expected: IpAddr = if pod.node == i {
                IpAddr::V4(CLIENT_IP)
            } else {
                IpAddr::V4(node.ip)
            };
            assert_eq!(
                ip_of(&a),
                expected,
                "{} via {} saw the wrong client",
                a.pod,
                node.name
            );
            *by_pod.entry(a.pod).or_default() += 1;
        }
    }
    assert_eq!(by_pod.len(), 3, "not every pod answered: {by_pod:?}");
}

/// 300 new connections through one NodePort spread within ±20% of even over 3 pods. The
/// client uses 300 consecutive source ports, so the outcome is a property of the flow hash
/// and the Maglev table, reproducible run after run.
#[test]
fn three_hundred_connections_spread_evenly() {
    if !privileged("three_hundred_connections_spread_evenly") {
        return;
    }
    let t = tomcat6("spread", 3);
    let addr = t.node_port(0);
    let counts = t
        .cluster
        .client
        .enter(|| {
            let mut counts: BTreeMap<String, u32> = BTreeMap::new();
            // Below the ephemeral range (32768+), so no earlier connection holds them.
            for port in 20_000..20_300 {
                let a = echo::http_get_from(addr, port, T).expect("GET");
                *counts.entry(a.pod).or_default() += 1;
            }
            counts
        })
        .expect("netns");
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (pod, n) in &counts {
        assert!((80..=120).contains(n), "{pod} got {n} of 300: {counts:?}");
    }
}

/// A 64 MiB download through each node's NodePort arrives intact, byte for byte, whichever pod
/// serves it (checksums on the wire: `translated_packets_carry_valid_checksums_on_the_wire`).
#[test]
fn large_transfer_through_nodeport_is_intact() {
    if !privileged("large_transfer_through_nodeport_is_intact") {
        return;
    }
    let t = tomcat6("big", 3);
    for i in 0..3 {
        let addr = t.node_port(i);
        let pod = t
            .cluster
            .client
            .enter(|| echo::download(addr, 64 << 20, Duration::from_secs(20)))
            .expect("netns")
            .unwrap_or_else(|e| panic!("download via node {i}: {e}"));
        assert!(pod.starts_with("tomcat6-"), "{pod}");
    }
}

/// ClusterIP from a pod: remote backends see the pod's own address; the pod reaching itself
/// (hairpin) works and is seen from 169.254.42.1.
#[test]
fn cluster_ip_from_a_pod() {
    if !privileged("cluster_ip_from_a_pod") {
        return;
    }
    let t = tomcat6("cip", 3);
    let me = &t.cluster.pods[0];
    let mut seen = BTreeMap::new();
    for _ in 0..30 {
        let a = get(&me.ns, SocketAddrV4::new(CLUSTER_IP, 80));
        let expected = if a.pod == me.name {
            IpAddr::V4(Ipv4Addr::new(169, 254, 42, 1))
        } else {
            IpAddr::V4(me.ip)
        };
        assert_eq!(ip_of(&a), expected, "{} saw the wrong client", a.pod);
        *seen.entry(a.pod).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// `xlb-echo ask <proto> <addr>` run as a process of node `node` itself (its network
/// namespace and cgroup): the answer and the peer address its socket reported.
fn ask_from_node(
    c: &Cluster,
    node: usize,
    proto: &str,
    addr: SocketAddrV4,
) -> Result<(Answer, SocketAddr), String> {
    let out = c
        .node_process(node, echo_bin())
        .map_err(|e| e.to_string())?
        .args(["ask", proto, &addr.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    echo::parse_asked(String::from_utf8_lossy(&out.stdout).trim()).map_err(|e| e.to_string())
}

/// Processes of a node itself (host-network pods, the kubelet) reach a ClusterIP as through
/// kube-proxy: socket-level load balancing points each `connect()` at a backend, every pod
/// answers, the pods see the node's address, and the socket reports the ClusterIP as its peer.
#[test]
fn cluster_ip_from_the_node_itself() {
    if !privileged("cluster_ip_from_the_node_itself") {
        return;
    }
    let t = tomcat6("host", 3);
    let cluster_ip = SocketAddrV4::new(CLUSTER_IP, 80);
    let mut seen = BTreeMap::new();
    for _ in 0..40 {
        let (a, peer) = ask_from_node(&t.cluster, 0, "tcp", cluster_ip)
            .unwrap_or_else(|e| panic!("ClusterIP from the node: {e}"));
        assert_eq!(peer, SocketAddr::V4(cluster_ip), "getpeername");
        assert_eq!(ip_of(&a), IpAddr::V4(t.cluster.nodes[0].ip), "{a:?}");
        *seen.entry(a.pod).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    // A dual-stack socket to the IPv4-mapped ClusterIP (Java's default) is translated too.
    let (a, peer) = ask_from_node(&t.cluster, 0, "tcp6", cluster_ip)
        .unwrap_or_else(|e| panic!("mapped ClusterIP from the node: {e}"));
    assert!(a.pod.starts_with("tomcat6-"), "{a:?}");
    assert_eq!(
        peer,
        SocketAddr::V6(std::net::SocketAddrV6::new(
            CLUSTER_IP.to_ipv6_mapped(),
            80,
            0,
            0
        )),
        "getpeername of a dual-stack socket"
    );
    let translated = || {
        let page = local_get(&t.cluster.nodes[0].ns, 10249, "/metrics").1;
        sample(
            &page,
            "xlb_datapath_events_total{event=\"sock_translated\"}",
        )
    };
    let before = translated();
    assert!(before >= 41, "{before} socket translations counted");
    // A pod's process in the node's cgroup (as every pod is under the cgroup root in a
    // cluster) is not translated at its socket: its own interface's TC program does it.
    let pod = &t.cluster.pods[0];
    let mut cmd = pod.ns.command(echo_bin());
    lb_lab::in_cgroup(&mut cmd, &t.cluster.node_cgroup(0).expect("cgroup")).expect("cgroup");
    let out = cmd
        .args(["ask", "tcp", &cluster_ip.to_string()])
        .output()
        .expect("xlb-echo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, _) = echo::parse_asked(String::from_utf8_lossy(&out.stdout).trim()).expect("answer");
    let expected = if a.pod == pod.name {
        IpAddr::V4(Ipv4Addr::new(169, 254, 42, 1))
    } else {
        IpAddr::V4(pod.ip)
    };
    assert_eq!(ip_of(&a), expected, "{a:?}");
    assert_eq!(translated(), before, "a pod's socket was translated");

    // A Service without endpoints: the node's connect() fails at once instead of hanging.
    let syncs = t.cluster.all_agent_syncs();
    t.cluster
        .write_manifest(
            "empty.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: default}\n\
             spec:\n  clusterIP: 10.96.0.99\n  ports: [{port: 80, targetPort: 8080}]\n",
        )
        .expect("manifest");
    t.cluster.wait_synced_since(&syncs, SYNC).expect("sync");
    // EPERM from connect() itself, not a timeout.
    let refused = ask_from_node(
        &t.cluster,
        0,
        "tcp",
        SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 80),
    )
    .expect_err("a Service without endpoints answered");
    assert!(refused.contains("Operation not permitted"), "{refused}");
}

/// A UDP ClusterIP Service (10.96.0.53:53 → 8080) with one pod on node 1.
const DNS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec:
  clusterIP: 10.96.0.53
  ports: [{name: dns, port: 53, targetPort: 8080, protocol: UDP}]
";

/// Sockets of the node's processes churned by the `sock_churn` test (the map holds 262,144).
const SOCK_CHURN: u64 = 1_000_000;

/// Socket-level load balancing under socket churn: 1,000,000 short-lived connected UDP sockets
/// of a node process come and go (as DNS clients' do) while one long-lived socket keeps asking
/// the Service: every answer it reads comes from the Service address (its reverse translation
/// was never pushed out), and the closed sockets' translations are gone from the map.
#[test]
fn socket_churn_keeps_the_long_lived_socket_translated() {
    if !privileged("socket_churn_keeps_the_long_lived_socket_translated") {
        return;
    }
    let mut c = Cluster::new("churn", 1).expect("lab");
    c.add_pod("dns-0", 0, &echo_bin(), &[8080]).expect("pod");
    c.write_manifest("dns.yaml", DNS).expect("manifest");
    let ports = [("dns", 8080, "UDP")];
    c.write_manifest(
        "eps.yaml",
        &c.endpoint_slice("dns", &ports, &["dns-0"], &EndpointStates::default()),
    )
    .expect("manifest");
    start_agents(&c);
    let service = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53);
    eventually("UDP ClusterIP from the node", || {
        ask_from_node(&c, 0, "udp", service).map_err(std::io::Error::other)
    });
    let out = c
        .node_process(0, echo_bin())
        .expect("node process")
        .args([
            "sock-churn",
            &service.to_string(),
            &SOCK_CHURN.to_string(),
            "50000",
        ])
        .output()
        .expect("xlb-echo sock-churn");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let asks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("sockets="))
        .collect();
    let done = stdout
        .lines()
        .find(|l| l.starts_with("done "))
        .unwrap_or("");
    assert_eq!(
        done.split_whitespace().nth(1),
        Some(format!("sockets={SOCK_CHURN}").as_str()),
        "{stdout}"
    );
    assert_eq!(asks.len(), (SOCK_CHURN / 50_000 + 1) as usize, "{stdout}");
    for ask in &asks {
        assert!(
            ask.contains(&format!(" from={service} pod=dns-0 ")),
            "the long-lived socket read an answer not from the Service: {ask}\n{stdout}"
        );
    }
    // Only the long-lived socket's translation (and the readiness ask's, if its socket was
    // unconnected) is left: every churned socket's went with it. The gauge is refreshed by a
    // periodic walk of the map, so wait for a walk after the churn.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let page = local_get(&c.nodes[0].ns, 10249, "/metrics").1;
        let entries = page
            .contains("xlb_map_entries{map=\"sockets\"}")
            .then(|| sample(&page, "xlb_map_entries{map=\"sockets\"}"));
        if entries.is_some_and(|n| n <= 4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{entries:?} socket translations left after {SOCK_CHURN} sockets closed ({done})"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn start_agents(c: &Cluster) {
    for n in 0..c.nodes.len() {
        c.start_agent(n, &xlb_bin(), &[]).expect("agent");
    }
}

/// Retries `f` until it succeeds (the agents may still be syncing).
fn eventually<T>(what: &str, mut f: impl FnMut() -> std::io::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The reference case's SNAT path at the scale users run it: Service `remote` (TCP NodePort
/// 32510 and UDP NodePort 32653 → 8080) whose only pod runs on node 2, reached from the client
/// through node 1, which SNATs every flow to its own address.
const REMOTE: &str = r"
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  ports:
    - {name: http, port: 80, targetPort: 8080, nodePort: 32510, protocol: TCP}
    - {name: dns, port: 53, targetPort: 8080, nodePort: 32653, protocol: UDP}
";

/// Connections (or exchanges) each SNAT test makes: more than four times what the SNAT range
/// of xlb's first releases held (4,536 ports, each kept 120 s after its flow).
const SNAT_SCALE: usize = 20_000;

/// A cluster of two nodes with Service `remote`'s only pod on node 2, agents running.
fn remote_backend(tag: &str) -> Cluster {
    let mut c = Cluster::new(tag, 2).expect("lab");
    c.add_pod("remote-0", 1, &echo_bin(), &[8080]).expect("pod");
    c.write_manifest("remote.yaml", REMOTE).expect("manifest");
    let ports = [("http", 8080, "TCP"), ("dns", 8080, "UDP")];
    c.write_manifest(
        "eps.yaml",
        &c.endpoint_slice("remote", &ports, &["remote-0"], &EndpointStates::default()),
    )
    .expect("manifest");
    start_agents(&c);
    c
}

/// Runs `one` `SNAT_SCALE` times from the client; panics at the first failure, saying which
/// and how far it got, and checks every answer came from the pod, as seen from node 1.
fn sustain(c: &Cluster, what: &str, one: impl Fn() -> std::io::Result<Answer> + Send + Sync) {
    let node1 = c.nodes[0].ip;
    let started = Instant::now();
    let done = c
        .client
        .enter(|| {
            for i in 0..SNAT_SCALE {
                match one() {
                    Ok(a) if a.pod == "remote-0" && ip_of(&a) == IpAddr::V4(node1) => {}
                    Ok(a) => return Err(format!("{what} {i}: answered by {a:?}")),
                    Err(e) => {
                        return Err(format!(
                            "{what} {i} of {SNAT_SCALE} failed after {:.1} s: {e}",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                }
            }
            Ok(())
        })
        .expect("netns");
    if let Err(e) = done {
        let log = std::fs::read_to_string(c.log_path("agent-node1.log")).unwrap_or_default();
        let tail: String = log.lines().rev().take(20).collect::<Vec<_>>().join("\n");
        panic!("{e}\nagent log (last lines, newest first):\n{tail}");
    }
    eprintln!(
        "{what}: {SNAT_SCALE} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// 20,000 sequential TCP connections (one HTTP/1.0-style request each, the server closing
/// first, as curl against Tomcat) through node 1's NodePort to the pod on node 2: every one
/// succeeds and is answered by that pod. Each connection's SNAT port stays with it for the
/// backend's `TIME_WAIT`, so this needs a range of more than 20,000 ports.
#[test]
fn snat_sustains_tcp_connections() {
    if !privileged("snat_sustains_tcp_connections") {
        return;
    }
    let c = remote_backend("snattcp");
    let addr = SocketAddrV4::new(c.nodes[0].ip, 32510);
    eventually("first answer", || {
        c.client
            .enter(|| echo::http_get(addr, T))
            .map_err(std::io::Error::other)?
    });
    sustain(&c, "TCP connection", || echo::http_get(addr, T));
}

/// 20,000 UDP request/response exchanges, each from a new socket (as a DNS client's), through
/// node 1's NodePort to the pod on node 2: every one answered by that pod.
#[test]
fn snat_sustains_udp_exchanges() {
    if !privileged("snat_sustains_udp_exchanges") {
        return;
    }
    let c = remote_backend("snatudp");
    let addr = SocketAddrV4::new(c.nodes[0].ip, 32653);
    eventually("first answer", || {
        c.client
            .enter(|| echo::udp_ask(addr, T))
            .map_err(std::io::Error::other)?
    });
    sustain(&c, "UDP exchange", || echo::udp_ask(addr, T));
}

/// Two UDP NodePort Services through node 1, each with one pod on another node: `a` (32701,
/// pod on node 2) and `b` (32702, pod on node 3).
const TWO_REMOTE: &str = r"
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.41
  ports: [{name: dns, port: 53, targetPort: 8080, nodePort: 32701, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.42
  ports: [{name: dns, port: 53, targetPort: 8080, nodePort: 32702, protocol: UDP}]
";

/// SNAT ports of one backend run out: node 1 SNATs with 8 ports (`--snat-ports`) and a 2 s
/// UDP timeout. Eight exchanges to Service `a` hold all of pod a's ports; the ninth gets no
/// answer and is counted as `drop_snat_exhausted`, while exchanges to Service `b` (another
/// backend, its own 8 ports) are answered; once the UDP timeout has passed, `a` answers again.
#[test]
fn snat_exhaustion_of_one_backend_spares_the_others_and_recovers() {
    if !privileged("snat_exhaustion_of_one_backend_spares_the_others_and_recovers") {
        return;
    }
    let mut c = Cluster::new("snatfull", 3).expect("lab");
    c.add_pod("pod-a", 1, &echo_bin(), &[8080]).expect("pod");
    c.add_pod("pod-b", 2, &echo_bin(), &[8080]).expect("pod");
    c.write_manifest("two.yaml", TWO_REMOTE).expect("manifest");
    let ports = [("dns", 8080, "UDP")];
    let states = EndpointStates::default();
    for (service, pod) in [("a", "pod-a"), ("b", "pod-b")] {
        let slice = c.endpoint_slice(service, &ports, &[pod], &states);
        c.write_manifest(&format!("{service}-eps.yaml"), &slice)
            .expect("manifest");
    }
    c.start_agent(
        0,
        &xlb_bin(),
        &[
            "--snat-ports",
            "40000-40007",
            "--conntrack-udp-timeout",
            "2s",
        ],
    )
    .expect("agent");
    for n in 1..3 {
        c.start_agent(n, &xlb_bin(), &[]).expect("agent");
    }
    let node1 = c.nodes[0].ip;
    let (a, b) = (
        SocketAddrV4::new(node1, 32701),
        SocketAddrV4::new(node1, 32702),
    );
    let ask = |addr| c.client.enter(|| echo::udp_ask(addr, T)).expect("netns");
    let exhausted = || {
        let page = local_get(&c.nodes[0].ns, 10249, "/metrics").1;
        sample(
            &page,
            "xlb_datapath_packets_total{verdict=\"drop_snat_exhausted\"}",
        )
    };
    for addr in [a, b] {
        eventually("first answer", || ask(addr));
    }
    // Let the first answers' flows time out: each backend starts with all 8 ports free.
    thread::sleep(Duration::from_secs(3));
    let before = exhausted();
    let fill = Instant::now();
    for i in 0..8 {
        let answer = ask(a).unwrap_or_else(|e| panic!("exchange {i} with a: {e}"));
        assert_eq!(answer.pod, "pod-a");
    }
    let refused = c
        .client
        .enter(|| echo::udp_ask(a, Duration::from_millis(500)))
        .expect("netns");
    assert!(
        refused.is_err(),
        "a ninth flow to pod a got a port: {refused:?}"
    );
    assert!(exhausted() > before, "the refused flow was not counted");
    for i in 0..8 {
        let answer = ask(b).unwrap_or_else(|e| panic!("exchange {i} with b: {e}"));
        assert_eq!(answer.pod, "pod-b");
    }
    assert!(
        fill.elapsed() < Duration::from_secs(2),
        "too slow to show exhaustion within the UDP timeout: {:?}",
        fill.elapsed()
    );
    thread::sleep(Duration::from_secs(3));
    let answer = ask(a).expect("pod a's ports were not given back after the UDP timeout");
    assert_eq!(answer.pod, "pod-a");
}

/// The node's reserved ports, as its kernel lists them.
fn reserved_ports(ns: &Netns) -> String {
    let out = lb_lab::run(
        ns.command("cat")
            .arg("/proc/sys/net/ipv4/ip_local_reserved_ports"),
    )
    .expect("reading ip_local_reserved_ports");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The agent adds its SNAT ranges to the node's `ip_local_reserved_ports` (keeping what an
/// operator reserved), so a node process asking for any port never gets one: a thousand
/// sockets bound to port 0 all get ports outside them. Its metrics report the ports in use
/// per backend and address, and `xlb cleanup` removes exactly what it added.
#[test]
fn snat_ports_are_reserved_on_the_node_and_released_by_cleanup() {
    if !privileged("snat_ports_are_reserved_on_the_node_and_released_by_cleanup") {
        return;
    }
    let mut c = Cluster::new("snatres", 2).expect("lab");
    let node1 = c.nodes[0].ns.clone();
    node1
        .sysctl("net.ipv4.ip_local_reserved_ports", "5000,20000-20009")
        .expect("an operator's reservation");
    // Every port an unbound socket may get, so the kernel would pick SNAT ports if it could.
    node1
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        .expect("a wide local port range");
    c.add_pod("remote-0", 1, &echo_bin(), &[8080]).expect("pod");
    c.write_manifest("remote.yaml", REMOTE).expect("manifest");
    let ports = [("http", 8080, "TCP"), ("dns", 8080, "UDP")];
    c.write_manifest(
        "eps.yaml",
        &c.endpoint_slice("remote", &ports, &["remote-0"], &EndpointStates::default()),
    )
    .expect("manifest");
    let agent = c.start_agent(0, &xlb_bin(), &[]).expect("agent");
    let addr = SocketAddrV4::new(c.nodes[0].ip, 32510);
    eventually("first answer", || {
        c.client
            .enter(|| echo::http_get(addr, T))
            .map_err(std::io::Error::other)?
    });
    assert_eq!(
        reserved_ports(&node1),
        "1024-29999,61000-65535",
        "the SNAT ranges joined the operator's reservation"
    );
    let bound: Vec<u16> = node1
        .enter(|| {
            let sockets: Vec<std::net::UdpSocket> = (0..1000)
                .map(|_| std::net::UdpSocket::bind("0.0.0.0:0").expect("bind"))
                .collect();
            sockets
                .iter()
                .map(|s| s.local_addr().expect("addr").port())
                .collect()
        })
        .expect("netns");
    let snat = |p: &u16| (1024..=29999).contains(p) || (61000..=65535).contains(p);
    assert!(
        !bound.iter().any(snat),
        "the kernel gave a node socket SNAT ports: {:?}",
        bound.iter().filter(|p| snat(p)).collect::<Vec<_>>()
    );
    // Ports in use show within the upkeep's period (10 s).
    for _ in 0..50 {
        c.client
            .enter(|| echo::http_get(addr, T))
            .expect("netns")
            .expect("a connection");
    }
    let pod = format!("{}:8080/tcp", c.pods[0].ip);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, page) = local_get(&node1, 10249, "/metrics");
        let series = format!("xlb_snat_backend_ports_in_use{{backend=\"{pod}\"}}");
        // The first count may predate the 50 connections: wait for one that follows them.
        if page.lines().any(|l| l.starts_with(&series)) && sample(&page, &series) >= 50 {
            assert!(
                sample(&page, "xlb_snat_backend_port_capacity") > 33_000,
                "{page}"
            );
            let by_address = format!("xlb_snat_ports_in_use{{address=\"{}\"}}", c.nodes[0].ip);
            assert!(sample(&page, &by_address) >= 50, "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SNAT fill of 50 ports in\n{page}"
        );
        thread::sleep(Duration::from_millis(500));
    }
    c.lab.kill(agent);
    let out = node1
        .command_host_mounts(xlb_bin())
        .arg("cleanup")
        .arg("--pin-dir")
        .arg(c.pin_dir(0))
        .output()
        .expect("xlb cleanup");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert_eq!(
        reserved_ports(&node1),
        "5000,20000-20009",
        "cleanup left the SNAT ranges reserved, or took the operator's: {said}"
    );
}

/// externalTrafficPolicy=Local: each node answers only from its own pod, which sees the
/// client's real address.
#[test]
fn external_traffic_policy_local_keeps_the_client_address() {
    if !privileged("external_traffic_policy_local_keeps_the_client_address") {
        return;
    }
    let mut c = Cluster::new("etpl", 3).expect("lab");
    for i in 0..3 {
        c.add_pod(&pod_name(i), i, &echo_bin(), &[TARGET_PORT])
            .expect("pod");
    }
    let svc = lb_lab::tomcat6::SERVICE_YAML.replace(
        "  type: NodePort\n",
        "  type: NodePort\n  externalTrafficPolicy: Local\n",
    );
    assert!(svc.contains("externalTrafficPolicy: Local"));
    c.write_manifest("svc.yaml", &svc).expect("manifest");
    let pods: Vec<String> = c.pods.iter().map(|p| p.name.clone()).collect();
    let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
    c.write_manifest(
        "eps.yaml",
        &c.endpoint_slice(
            "tomcat6",
            &[("", TARGET_PORT, "TCP")],
            &pods,
            &EndpointStates::default(),
        ),
    )
    .expect("manifest");
    start_agents(&c);
    for (i, node) in c.nodes.iter().enumerate() {
        let addr = SocketAddrV4::new(node.ip, NODE_PORT);
        for _ in 0..8 {
            let a = eventually("NodePort", || {
                c.client
                    .enter(|| echo::http_get(addr, T))
                    .map_err(std::io::Error::other)?
            });
            assert_eq!(
                c.pod(&a.pod).map(|p| p.node),
                Some(i),
                "{} answered via {}",
                a.pod,
                node.name
            );
            assert_eq!(ip_of(&a), IpAddr::V4(CLIENT_IP));
        }
    }
}

const MULTI: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: multi, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.20
  externalIPs: ["198.51.100.20"]
  ports:
    - {name: http, port: 80, targetPort: web, nodePort: 32600, protocol: TCP}
    - {name: alt, port: 81, targetPort: 8081, nodePort: 32601, protocol: TCP}
    - {name: dns, port: 53, targetPort: 8080, nodePort: 32653, protocol: UDP}
status:
  loadBalancer:
    ingress: [{ip: "198.51.100.10"}]
"#;

/// One Service with a named targetPort, a second TCP port and a UDP port, reached through
/// its LoadBalancer ingress IP, its ExternalIP, its NodePorts and its ClusterIP.
#[test]
fn load_balancer_external_ip_udp_multi_port_named_target_port() {
    if !privileged("load_balancer_external_ip_udp_multi_port_named_target_port") {
        return;
    }
    let mut c = Cluster::new("multi", 2).expect("lab");
    for i in 0..2 {
        c.add_pod(&format!("multi-{i}"), i, &echo_bin(), &[8080, 8081])
            .expect("pod");
    }
    c.write_manifest("multi.yaml", MULTI).expect("manifest");
    let ports = [
        ("http", 8080, "TCP"),
        ("alt", 8081, "TCP"),
        ("dns", 8080, "UDP"),
    ];
    c.write_manifest(
        "eps.yaml",
        &c.endpoint_slice(
            "multi",
            &ports,
            &["multi-0", "multi-1"],
            &EndpointStates::default(),
        ),
    )
    .expect("manifest");
    start_agents(&c);
    let lb = |ip: [u8; 4], port| SocketAddrV4::new(Ipv4Addr::from(ip), port);
    for (what, addr) in [
        ("LoadBalancer ingress IP", lb([198, 51, 100, 10], 80)),
        ("ExternalIP", lb([198, 51, 100, 20], 80)),
        ("second port", lb([198, 51, 100, 10], 81)),
        ("ClusterIP from outside", lb([10, 96, 0, 20], 81)),
        (
            "NodePort of node 2",
            SocketAddrV4::new(c.nodes[1].ip, 32600),
        ),
    ] {
        let a = eventually(what, || {
            c.client
                .enter(|| echo::http_get(addr, T))
                .map_err(std::io::Error::other)?
        });
        assert!(a.pod.starts_with("multi-"), "{what}: {a:?}");
    }
    for addr in [
        lb([198, 51, 100, 10], 53),
        SocketAddrV4::new(c.nodes[0].ip, 32653),
        lb([10, 96, 0, 20], 53),
    ] {
        let a = eventually("UDP", || {
            c.client
                .enter(|| echo::udp_ask(addr, T))
                .map_err(std::io::Error::other)?
        });
        assert!(a.pod.starts_with("multi-"), "UDP {addr}: {a:?}");
    }
    // UDP from the node itself (socket-level load balancing of sendto/recvfrom).
    let (a, from) = ask_from_node(&c, 0, "udp", lb([10, 96, 0, 20], 53))
        .unwrap_or_else(|e| panic!("UDP ClusterIP from the node: {e}"));
    assert!(a.pod.starts_with("multi-"), "{a:?}");
    assert_eq!(
        from,
        SocketAddr::V4(lb([10, 96, 0, 20], 53)),
        "recvfrom source"
    );
    // UDP from a pod to the ClusterIP.
    let a = eventually("UDP from pod", || {
        c.pods[0]
            .ns
            .enter(|| echo::udp_ask(lb([10, 96, 0, 20], 53), T))
            .map_err(std::io::Error::other)?
    });
    assert!(a.pod.starts_with("multi-"));
    udp_session_moves_off_a_departed_backend(&c, &ports);
}

/// A node process's connected UDP socket follows its backend's departure: kube-proxy flushes
/// the UDP conntrack entries of a removed endpoint; xlb ends the socket (`sock_diag`), its owner
/// reconnects and is balanced anew. (Without that, the socket would keep reaching the pod,
/// which still runs: only its endpoint was removed.)
fn udp_session_moves_off_a_departed_backend(c: &Cluster, ports: &[(&str, u16, &str)]) {
    let session_log = c.log_path("udp-session.log");
    let mut session = c.node_process(0, echo_bin()).expect("node process");
    session
        .args(["udp-session", "10.96.0.20:53", "400"])
        .stdout(c.log_file("udp-session.log").expect("log"));
    c.lab.spawn(&mut session).expect("udp session");
    let answers = |log: &str| -> Vec<String> {
        log.lines()
            .filter_map(|l| l.strip_prefix("pod=")?.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    };
    let first = eventually("UDP session", || {
        let log = std::fs::read_to_string(&session_log)?;
        answers(&log)
            .first()
            .cloned()
            .ok_or_else(|| std::io::Error::other(format!("no answer yet: {log:?}")))
    });
    let other = if first == "multi-0" {
        "multi-1"
    } else {
        "multi-0"
    };
    let syncs = c.all_agent_syncs();
    c.write_manifest(
        "eps.yaml",
        &c.endpoint_slice("multi", ports, &[other], &EndpointStates::default()),
    )
    .expect("manifest");
    c.wait_synced_since(&syncs, SYNC).expect("sync");
    eventually("the UDP session moving off the departed pod", || {
        let log = std::fs::read_to_string(&session_log)?;
        let seen = answers(&log);
        if seen.last().map(String::as_str) == Some(other) {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("still on {first}: {log}")))
        }
    });
}

/// Scale 3 → 5 → 1 while connections keep coming: once the agents applied a change, no new
/// connection reaches a removed pod, and long-lived connections to pods that stay keep working.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario, told in the order it happens"
)]
fn scaling_keeps_established_connections_and_stops_new_ones_to_removed_pods() {
    if !privileged("scaling_keeps_established_connections_and_stops_new_ones_to_removed_pods") {
        return;
    }
    let mut t = tomcat6("scale", 3);
    let addr = t.node_port(0);
    // Long-lived connections, one per pod that will stay (pod 0 stays to the end).
    let mut keep: Vec<(KeepAlive, String)> = Vec::new();
    t.cluster
        .client
        .enter(|| {
            for _ in 0..40 {
                let mut k = KeepAlive::connect(addr, T).expect("connect");
                let a = k.get().expect("first request");
                if a.pod == pod_name(0) && keep.len() < 3 {
                    keep.push((k, a.pod));
                }
            }
        })
        .expect("netns");
    assert!(!keep.is_empty(), "no long-lived connection landed on pod 0");

    // A client keeps opening new connections through all the changes.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let client = t.cluster.client.clone();
    let log: std::sync::Mutex<Vec<(Instant, Result<String, String>)>> =
        std::sync::Mutex::new(Vec::new());
    let (t_up, t_down) = thread::scope(|s| {
        s.spawn(|| {
            client
                .enter(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        let r = echo::http_get(addr, T)
                            .map(|a| a.pod)
                            .map_err(|e| e.to_string());
                        log.lock().expect("log").push((started, r));
                        // A steady client, not a flood: a few hundred connections a second.
                        thread::sleep(Duration::from_millis(2));
                    }
                })
                .expect("netns");
        });
        // Scale up to 5.
        for i in 3..5 {
            t.cluster
                .add_pod(&pod_name(i), i % 3, &echo_bin(), &[TARGET_PORT])
                .expect("pod");
        }
        let before = t.cluster.all_agent_syncs();
        t.write_endpoints(&EndpointStates::default())
            .expect("endpoints");
        t.cluster.wait_synced_since(&before, SYNC).expect("sync");
        let t_up = Instant::now();
        thread::sleep(Duration::from_millis(700));
        // Scale down to 1: endpoints first (as the controller does); the pods go away after
        // a grace period, as kubelet ends them.
        let before = t.cluster.all_agent_syncs();
        let stays = [t.cluster.pods[0].name.clone()];
        let states = EndpointStates::default();
        let pods: Vec<&str> = stays.iter().map(String::as_str).collect();
        let slice =
            t.cluster
                .endpoint_slice("tomcat6", &[("", TARGET_PORT, "TCP")], &pods, &states);
        t.cluster
            .write_manifest("tomcat6-endpoints.yaml", &slice)
            .expect("endpoints");
        t.cluster.wait_synced_since(&before, SYNC).expect("sync");
        let t_down = Instant::now();
        // A termination grace period: requests in flight to the leaving pods finish.
        thread::sleep(Duration::from_secs(1));
        for i in 1..5 {
            t.cluster.remove_pod(&pod_name(i));
        }
        thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (t_up, t_down)
    });
    let log = log.into_inner().expect("log");
    for (at, r) in log.iter().filter(|(_, r)| r.is_err()) {
        let rel = |t: Instant| {
            at.saturating_duration_since(t).as_secs_f64()
                - t.saturating_duration_since(*at).as_secs_f64()
        };
        eprintln!(
            "scaling: a connection started {:+.3} s from scale-up, {:+.3} s from scale-down failed: {r:?}",
            rel(t_up),
            rel(t_down)
        );
    }
    // Only a request still in flight to a leaving pod when it ends (past the grace period, on
    // a loaded machine) may fail; every connection opened after a change applied must work.
    let failed: Vec<_> = log
        .iter()
        .filter(|(at, r)| r.is_err() && (*at > t_down || *at < t_up))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        log.len()
    );
    let after_up: std::collections::BTreeSet<&String> = log
        .iter()
        .filter(|(at, _)| *at > t_up && *at < t_down)
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    assert_eq!(after_up.len(), 5, "after scale-up: {after_up:?}");
    let after_down: Vec<&String> = log
        .iter()
        .filter(|(at, _)| *at > t_down)
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    assert!(
        after_down.len() >= 10,
        "too few connections after scale-down: {}",
        after_down.len()
    );
    assert!(
        after_down.iter().all(|p| **p == pod_name(0)),
        "a removed pod got a new connection after the change was applied: {after_down:?}"
    );
    check_keepalives(&t, &mut keep);
}

/// The log `name` once it contains `what` (panics after a while).
fn wait_for_log(c: &Cluster, name: &str, what: &str) -> String {
    let deadline = Instant::now() + SYNC;
    loop {
        let log = std::fs::read_to_string(c.log_path(name)).unwrap_or_default();
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never said {what:?}:\n{log}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `n` long-lived connections from the client, each with the pod it landed on.
fn keepalives(c: &Cluster, addr: SocketAddrV4, n: usize) -> Vec<(KeepAlive, String)> {
    c.client
        .enter(|| {
            (0..n)
                .map(|_| {
                    let mut k = KeepAlive::connect(addr, T).expect("connect");
                    let pod = k.get().expect("request").pod;
                    (k, pod)
                })
                .collect()
        })
        .expect("netns")
}

fn new_connections(t: &Tomcat6, addr: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    t.cluster
        .client
        .enter(|| {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let a = echo::http_get(addr, T).expect("new connection failed");
                *seen.entry(a.pod).or_insert(0) += 1;
            }
            seen
        })
        .expect("netns")
}

fn check_keepalives(t: &Tomcat6, keep: &mut [(KeepAlive, String)]) {
    t.cluster
        .client
        .enter(|| {
            for (k, pod) in keep.iter_mut() {
                let a = k.get().expect("a long-lived connection broke");
                assert_eq!(&a.pod, pod, "a long-lived connection changed pods");
            }
        })
        .expect("netns");
}

/// A pod that turns not-ready gets no new connections; when every endpoint is terminating,
/// the serving ones still get traffic (KEP-1669).
#[test]
fn readiness_and_terminating_fallback() {
    if !privileged("readiness_and_terminating_fallback") {
        return;
    }
    let t = tomcat6("ready", 3);
    let addr = t.node_port(1);
    let before = t.cluster.all_agent_syncs();
    let flipped = pod_name(2);
    t.write_endpoints(&EndpointStates {
        not_ready: vec![&flipped],
        ..EndpointStates::default()
    })
    .expect("endpoints");
    t.cluster.wait_synced_since(&before, SYNC).expect("sync");
    let seen = new_connections(&t, addr, 60);
    assert!(
        !seen.contains_key(&flipped),
        "a not-ready pod got new connections: {seen:?}"
    );
    assert_eq!(seen.len(), 2, "{seen:?}");

    let before = t.cluster.all_agent_syncs();
    let all: Vec<String> = (0..3).map(pod_name).collect();
    let states = EndpointStates {
        terminating: all.iter().map(String::as_str).collect(),
        not_serving: vec![all[0].as_str()],
        ..EndpointStates::default()
    };
    t.write_endpoints(&states).expect("endpoints");
    t.cluster.wait_synced_since(&before, SYNC).expect("sync");
    let seen = new_connections(&t, addr, 40);
    assert!(
        !seen.contains_key(&all[0]),
        "a terminating, not-serving pod got traffic: {seen:?}"
    );
    assert_eq!(
        seen.len(),
        2,
        "serving terminating pods must take the traffic: {seen:?}"
    );
}

/// Deleting the Service stops its traffic on every node.
#[test]
fn service_deletion_stops_traffic() {
    if !privileged("service_deletion_stops_traffic") {
        return;
    }
    let t = tomcat6("del", 3);
    let before = t.cluster.all_agent_syncs();
    t.cluster.remove_manifest("tomcat6.yaml").expect("rm");
    t.cluster.wait_synced_since(&before, SYNC).expect("sync");
    for i in 0..3 {
        let addr = t.node_port(i);
        let r = t
            .cluster
            .client
            .enter(|| echo::http_get(addr, Duration::from_millis(500)))
            .expect("netns");
        assert!(r.is_err(), "node {i} still answers on the NodePort: {r:?}");
    }
    let from_pod = t.cluster.pods[0].ns.enter(|| {
        echo::http_get(
            SocketAddrV4::new(CLUSTER_IP, 80),
            Duration::from_millis(500),
        )
    });
    assert!(from_pod.expect("netns").is_err(), "ClusterIP still answers");
}

/// kill -9 of an agent neither breaks a long-lived connection (a stream in progress, idle
/// keep-alive connections) nor fails a new one through its node, while it is down or after it
/// restarts and adopts its pinned datapath.
#[test]
fn agent_restart_drops_no_flow() {
    if !privileged("agent_restart_drops_no_flow") {
        return;
    }
    let t = tomcat6("restart", 3);
    let addr = t.node_port(0);
    let c = &t.cluster;
    let mut keep = keepalives(c, addr, 6);
    thread::scope(|s| {
        // A stream that runs through the whole kill and restart (96 MiB read slowly: at
        // least 12 s, a restart on a loaded machine takes several).
        let stream = s.spawn(|| {
            c.client
                .enter(|| echo::download_paced(addr, 96 << 20, T, Duration::from_millis(8)))
                .expect("netns")
        });
        thread::sleep(Duration::from_millis(200));
        kill_and_restart(&t, &mut keep);
        if stream.is_finished() {
            let ended = stream.join().expect("stream thread");
            panic!("the stream ended before the restart was over: {ended:?}");
        }
        let served = stream.join().expect("stream thread");
        assert!(served.is_ok(), "the long-lived stream broke: {served:?}");
    });
}

fn kill_and_restart(t: &Tomcat6, keep: &mut [(KeepAlive, String)]) {
    let addr = t.node_port(0);
    let c = &t.cluster;
    let before = c.agent_syncs(0);
    c.lab.kill(t.agents[0]);
    // Down: the pinned datapath keeps forwarding, old and new connections alike.
    let seen = new_connections(t, addr, 30);
    assert_eq!(seen.values().sum::<usize>(), 30);
    check_keepalives(t, keep);
    // Restarted: it adopts the pinned maps and replaces the programs in place.
    c.start_agent(0, &xlb_bin(), &[]).expect("restart");
    let deadline = Instant::now() + SYNC;
    while c.agent_syncs(0) <= before {
        // Requests keep flowing while the new agent starts.
        let a = c.client.enter(|| echo::http_get(addr, T)).expect("netns");
        assert!(
            a.is_ok(),
            "a new connection failed during the restart: {a:?}"
        );
        assert!(
            Instant::now() < deadline,
            "the restarted agent never synced"
        );
    }
    check_keepalives(t, keep);
    let seen = new_connections(t, addr, 60);
    assert_eq!(seen.len(), 3, "{seen:?}");
    // The attach lines follow the first sync line: wait for them.
    let log = wait_for_log(c, "agent-node1.log", "Replaced");
    assert!(log.contains("adopted the pinned datapath"), "{log}");
}

/// 200 pod interfaces come and go on node 1 (two waves of 100 veth devices named as pods'
/// are) while clients keep connecting through its NodePort: every connection succeeds, the
/// agent attaches TC to each and lets each go, and afterwards it holds no more pinned links,
/// attachments or open descriptors than before.
#[test]
fn pod_interface_churn_leaks_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    if !privileged("pod_interface_churn_leaks_nothing") {
        return;
    }
    let t = tomcat6("churn", 3);
    let c = &t.cluster;
    let node = &c.nodes[0].ns;
    let agent = t.agents[0];
    let fds = || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .expect("the agent's descriptors")
            .count()
    };
    let links = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(c.pin_dir(0).join("links"))
            .expect("links directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    let tc_attached = || {
        sample(
            &local_get(node, 10249, "/metrics").1,
            "xlb_attached_interfaces{hook=\"tc\"}",
        )
    };
    let (fds_before, links_before) = (fds(), links());
    assert_eq!(tc_attached(), 1, "one pod per node");
    let batch = c.log_path("churn.batch");
    let ip_batch = |verb: &str| {
        let script: String = (0..100)
            .map(|i| match verb {
                "add" => format!(
                    "link add lxcchurn{i} type veth peer name pchurn{i}\nlink set lxcchurn{i} up\n"
                ),
                _ => format!("link del lxcchurn{i}\n"),
            })
            .collect();
        std::fs::write(&batch, script).expect("batch file");
        node.ip([std::ffi::OsStr::new("-batch"), batch.as_os_str()])
            .expect("ip -batch");
    };
    let stop = AtomicBool::new(false);
    let addr = t.node_port(0);
    thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                c.client
                    .enter(|| echo::http_get(addr, T))
                    .expect("netns")
                    .unwrap_or_else(|e| panic!("connection {n} during the churn failed: {e}"));
                n += 1;
            }
            n
        });
        for wave in 0..2 {
            ip_batch("add");
            eventually(&format!("wave {wave}: TC on 101 interfaces"), || {
                let n = tc_attached();
                if n == 101 {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("{n}")))
                }
            });
            ip_batch("del");
            eventually(&format!("wave {wave}: TC on 1 interface"), || {
                let n = tc_attached();
                if n == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!("{n}")))
                }
            });
        }
        stop.store(true, Ordering::Relaxed);
        let n = traffic.join().expect("traffic thread");
        assert!(n > 0, "no connection made during the churn");
        eprintln!("{n} connections during the churn, all answered");
    });
    eventually("pinned links back to before", || {
        let now = links();
        if now == links_before {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{now:?}")))
        }
    });
    let fds_after = fds();
    assert!(
        fds_after <= fds_before + 4,
        "the agent holds {fds_after} descriptors, {fds_before} before the churn"
    );
}

/// More Services than the frontends map holds: node 1 runs with room for 12 frontends, 4 of
/// them tomcat6's (ClusterIP and NodePort, two scopes each). Five more NodePort Services
/// arrive at once: two fit and answer, three are refused (counted in `xlb_failed_services`,
/// logged once each) while tomcat6 and the two keep answering; deleting one that fits makes
/// room, and a refused one is programmed at the next sync.
#[test]
fn services_beyond_map_capacity_are_refused_and_the_rest_keep_working() {
    if !privileged("services_beyond_map_capacity_are_refused_and_the_rest_keep_working") {
        return;
    }
    let t = Tomcat6::start(
        "capacity",
        3,
        3,
        &xlb_bin(),
        &echo_bin(),
        &["--max-frontends", "12"],
    )
    .expect("lab");
    t.wait_ready(Duration::from_secs(20)).expect("agents ready");
    let c = &t.cluster;
    let node1 = c.nodes[0].ip;
    let pods: Vec<&str> = c.pods.iter().map(|p| p.name.as_str()).collect();
    let syncs = c.all_agent_syncs();
    for i in 0..5 {
        let service = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: extra-{i}, namespace: default}}\n\
             spec:\n  type: NodePort\n  clusterIP: 10.96.0.{}\n  ports: [{{port: 80, \
             targetPort: {TARGET_PORT}, nodePort: {}}}]\n",
            50 + i,
            32600 + i
        );
        let slice = c.endpoint_slice(
            &format!("extra-{i}"),
            &[("", TARGET_PORT, "TCP")],
            &pods,
            &EndpointStates::default(),
        );
        c.write_manifest(
            &format!("extra-{i}.yaml"),
            &format!("{service}---\n{slice}"),
        )
        .expect("manifest");
    }
    c.wait_synced_since(&syncs, SYNC).expect("sync");
    let answering = |what: &str| -> Vec<u16> {
        (0..5)
            .map(|i| 32600 + i)
            .filter(|&port| {
                let addr = SocketAddrV4::new(node1, port);
                c.client
                    .enter(|| echo::http_get(addr, Duration::from_millis(500)))
                    .expect("netns")
                    .is_ok()
            })
            .inspect(|port| eprintln!("{what}: {port} answers"))
            .collect()
    };
    let failed = || {
        sample(
            &local_get(&c.nodes[0].ns, 10249, "/metrics").1,
            "xlb_failed_services",
        )
    };
    eventually("three Services refused", || {
        let n = failed();
        if n == 3 {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{n} failed")))
        }
    });
    let fit = answering("full");
    assert_eq!(fit.len(), 2, "{fit:?}");
    let seen = new_connections(&t, t.node_port(0), 30);
    assert_eq!(seen.len(), 3, "tomcat6 lost pods: {seen:?}");
    let log = wait_for_log(c, "agent-node1.log", "does not fit the maps");
    assert_eq!(
        log.matches("does not fit the maps").count(),
        3,
        "each refusal logged once:\n{log}"
    );
    // Room for one more.
    let gone = fit[0] - 32600;
    c.remove_manifest(&format!("extra-{gone}.yaml"))
        .expect("remove");
    eventually("one refused Service programmed", || {
        let n = failed();
        if n == 2 {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("{n} failed")))
        }
    });
    let now = answering("after a deletion");
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains(&fit[0]), "{now:?}");
    assert!(now.contains(&fit[1]), "{now:?}");
}

/// The flow table and the conntrack map full: node 1 runs with one flow-table bucket (3
/// flows) and a 64-entry conntrack map, and 1,000 new connections go through it while
/// long-lived ones keep exchanging (one request per 10 new connections, so well within the
/// table's turnover). New flows beyond capacity are accepted (the LRU conntrack map evicts its
/// least recently used entries) and counted as `flow_overflow`; nothing is dropped for a full
/// map; the long-lived connections keep their pods; and one to the local pod left idle
/// meanwhile, whose entries were evicted, still answers from its pod (chosen again by the same
/// hash). (An idle SNATed connection whose entries were evicted is not recovered: see
/// docs/operating.md.)
#[test]
fn flow_table_and_conntrack_full_keep_established_flows() {
    if !privileged("flow_table_and_conntrack_full_keep_established_flows") {
        return;
    }
    let t = Tomcat6::start(
        "full",
        3,
        3,
        &xlb_bin(),
        &echo_bin(),
        &["--flow-buckets", "1", "--max-conntrack", "64"],
    )
    .expect("lab");
    t.wait_ready(Duration::from_secs(20)).expect("agents ready");
    let addr = t.node_port(0);
    let c = &t.cluster;
    let local_pod = t.cluster.pods[0].name.clone();
    let mut active = keepalives(c, addr, 6);
    let mut idle: Vec<(KeepAlive, String)> = keepalives(c, addr, 12)
        .into_iter()
        .filter(|(_, pod)| *pod == local_pod)
        .collect();
    assert!(!idle.is_empty(), "no connection landed on the local pod");
    let mut seen = BTreeMap::new();
    for _ in 0..100 {
        for (pod, n) in new_connections(&t, addr, 10) {
            *seen.entry(pod).or_insert(0) += n;
        }
        check_keepalives(&t, &mut active);
    }
    assert_eq!(seen.values().sum::<usize>(), 1000);
    assert_eq!(seen.len(), 3, "{seen:?}");
    check_keepalives(&t, &mut idle);
    let (_, page) = local_get(&c.nodes[0].ns, 10249, "/metrics");
    let overflow = sample(&page, "xlb_datapath_events_total{event=\"flow_overflow\"}");
    assert!(
        overflow >= 900,
        "{overflow} flows overflowed the 3-slot flow table"
    );
    assert_eq!(
        sample(
            &page,
            "xlb_datapath_packets_total{verdict=\"drop_map_full\"}"
        ),
        0,
        "{page}"
    );
}

/// Someone removes the pinned directory (`rm -r /sys/fs/bpf/xlb`) under a running agent: the
/// datapath stays attached (the agent holds its links and maps open), no connection breaks,
/// and within seconds the agent pins everything again (directory 0700, files 0600), so that
/// `xlb stats` reads the live state and a restarted agent adopts it with its flows.
#[test]
fn pinned_directory_removed_under_a_running_agent_is_repaired() {
    use std::os::unix::fs::PermissionsExt as _;
    if !privileged("pinned_directory_removed_under_a_running_agent_is_repaired") {
        return;
    }
    let t = tomcat6("pins", 3);
    let addr = t.node_port(0);
    let c = &t.cluster;
    let pin_dir = c.pin_dir(0);
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let frontends = pin_dir.join(lb_common::map_names::FRONTENDS);
    assert_eq!(mode(&pin_dir), 0o700);
    assert_eq!(mode(&frontends), 0o600);
    let mut keep = keepalives(c, addr, 6);
    thread::scope(|s| {
        let stream = s.spawn(|| {
            c.client
                .enter(|| echo::download_paced(addr, 32 << 20, T, Duration::from_millis(8)))
                .expect("netns")
        });
        thread::sleep(Duration::from_millis(200));
        std::fs::remove_dir_all(&pin_dir).expect("remove the pin directory");
        assert!(!pin_dir.exists());
        // Unpinned, still attached: old and new connections keep working.
        let seen = new_connections(&t, addr, 30);
        assert_eq!(seen.len(), 3, "{seen:?}");
        check_keepalives(&t, &mut keep);
        let (a, _) = ask_from_node(c, 0, "tcp", SocketAddrV4::new(CLUSTER_IP, 80))
            .unwrap_or_else(|e| panic!("ClusterIP from the node without pins: {e}"));
        assert!(a.pod.starts_with("tomcat6-"), "{a:?}");
        let log = wait_for_log(c, "agent-node1.log", "pinned them again (repaired)");
        assert!(frontends.exists(), "{log}");
        let served = stream.join().expect("stream thread");
        assert!(served.is_ok(), "the stream broke: {served:?}");
    });
    assert_eq!(mode(&pin_dir), 0o700);
    assert_eq!(mode(&frontends), 0o600);
    let links: Vec<String> = std::fs::read_dir(pin_dir.join("links"))
        .expect("links directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for hook in ["xdp-eth0-", "tc-", "sock-"] {
        assert!(
            links.iter().any(|l| l.starts_with(hook)),
            "no {hook} link pinned again: {links:?}"
        );
    }
    let (status, page) = local_get(&c.nodes[0].ns, 10249, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&page, "xlb_pins_repaired_total{kind=\"map\"}"),
        lb_userspace::datapath::loader::MAP_NAMES.len() as u64,
        "{page}"
    );
    assert_eq!(local_get(&c.nodes[0].ns, 10256, "/readyz").0, 200);
    // The inspection CLI reads the live maps from the new pins.
    let out = std::process::Command::new(xlb_bin())
        .args(["stats", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("xlb stats");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("nat_new"), "{printed}");
    // A restarted agent adopts the re-pinned maps: its flows survive it.
    kill_and_restart(&t, &mut keep);

    // `xlb cleanup` under the running agent still detaches the datapath: the agent lets its
    // links go instead of pinning them again, and says it is not ready.
    let out = std::process::Command::new(xlb_bin())
        .args(["cleanup", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("xlb cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("NodePort traffic untranslated after cleanup", || {
        match c.client.enter(|| echo::http_get(addr, T)).expect("netns") {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        }
    });
    let (status, body) = local_get(&c.nodes[0].ns, 10256, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("xlb cleanup"), "{body}");
    assert!(
        !pin_dir.exists(),
        "the agent pinned the datapath again after cleanup"
    );
}

/// An upgrade to a build whose maps have another layout version (simulated: the running
/// datapath's pinned maps are renamed to `_v0`, as an older build would have named them):
/// the new agent builds fresh service maps, takes the flow maps over (their entry layout is
/// unchanged), replaces the programs in place and removes the old maps; no connection breaks
/// or fails, also not one that opens while the programs are swapped.
#[test]
fn upgrade_across_map_layout_versions_drops_no_flow() {
    if !privileged("upgrade_across_map_layout_versions_drops_no_flow") {
        return;
    }
    let t = tomcat6("upgrade", 3);
    let addr = t.node_port(0);
    let c = &t.cluster;
    let mut keep = keepalives(c, addr, 6);
    c.lab.kill(t.agents[0]);
    let pins = c.pin_dir(0);
    let current = format!("_v{}", lb_common::ABI_VERSION);
    for e in std::fs::read_dir(&pins).expect("pin dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(base) = name.strip_suffix(&current) {
            std::fs::rename(e.path(), pins.join(format!("{base}_v0"))).expect("rename pin");
        }
    }
    let before = c.agent_syncs(0);
    c.start_agent(0, &xlb_bin(), &[]).expect("upgrade");
    let deadline = Instant::now() + SYNC;
    while c.agent_syncs(0) <= before {
        let a = c.client.enter(|| echo::http_get(addr, T)).expect("netns");
        assert!(
            a.is_ok(),
            "a new connection failed during the upgrade: {a:?}"
        );
        assert!(Instant::now() < deadline, "the upgraded agent never synced");
    }
    check_keepalives(&t, &mut keep);
    assert_eq!(new_connections(&t, addr, 60).len(), 3);
    let log = wait_for_log(c, "agent-node1.log", "Replaced");
    assert!(
        log.contains("took the flow map of the previous layout version over")
            && log.contains("backend ids of the previous layout version kept"),
        "{log}"
    );
    // The old maps go once the new programs are in place; the agent then says it is ready.
    let deadline = Instant::now() + SYNC;
    while c.agent_ready_count(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "the upgraded agent never got ready"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<String> = std::fs::read_dir(&pins)
        .expect("pin dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_v0"))
        .collect();
    assert!(left.is_empty(), "old maps left pinned: {left:?}");
}

/// The `xlb` binary of the previous release (layout version 1), which `cargo xtask test`
/// builds from git (`XLB_PREVIOUS_BIN`).
fn previous_xlb_bin() -> Option<PathBuf> {
    std::env::var_os("XLB_PREVIOUS_BIN").map(PathBuf::from)
}

/// An upgrade from the previous release (layout version 1, whose SNATed flows live in an LRU
/// SNAT map with ports of 61000-65535) to this one: the new agent takes that map over, so
/// the SNATed connections through the node keep working, and no new connection fails while
/// the programs are swapped; new SNATed connections then take ports of the new ranges.
#[test]
fn upgrade_from_the_previous_release_keeps_snat_flows() {
    if !privileged("upgrade_from_the_previous_release_keeps_snat_flows") {
        return;
    }
    let Some(previous) = previous_xlb_bin() else {
        eprintln!(
            "upgrade_from_the_previous_release_keeps_snat_flows: XLB_PREVIOUS_BIN is not set \
             (cargo xtask test builds the previous release and sets it)"
        );
        return;
    };
    let t = Tomcat6::start("prevup", 3, 3, &previous, &echo_bin(), &[]).expect("lab");
    t.wait_ready(Duration::from_secs(20))
        .expect("previous agents ready");
    let addr = t.node_port(0);
    let c = &t.cluster;
    let mut keep = keepalives(c, addr, 9);
    let node1 = IpAddr::V4(c.nodes[0].ip);
    // The SNAT ports of the kept connections that node 1 SNATs, as their pods see them.
    let snat_ports = |keep: &mut [(KeepAlive, String)]| -> Vec<u16> {
        c.client
            .enter(|| {
                keep.iter_mut()
                    .map(|(k, pod)| {
                        let a = k.get().expect("a long-lived connection broke");
                        assert_eq!(&a.pod, pod, "a long-lived connection changed pods");
                        a
                    })
                    .filter(|a| ip_of(a) == node1)
                    .map(|a| a.client.port())
                    .collect()
            })
            .expect("netns")
    };
    let old_ports = snat_ports(&mut keep);
    assert!(
        !old_ports.is_empty() && old_ports.iter().all(|p| *p >= 61000),
        "SNATed connections of the previous release: ports {old_ports:?}"
    );
    c.lab.kill(t.agents[0]);
    let before = c.agent_syncs(0);
    c.start_agent(0, &xlb_bin(), &[]).expect("upgrade");
    let deadline = Instant::now() + SYNC;
    while c.agent_syncs(0) <= before {
        let a = c.client.enter(|| echo::http_get(addr, T)).expect("netns");
        assert!(
            a.is_ok(),
            "a new connection failed during the upgrade: {a:?}"
        );
        assert!(Instant::now() < deadline, "the upgraded agent never synced");
    }
    // Ready (the second time in this log) once the old programs are gone everywhere.
    let deadline = Instant::now() + SYNC;
    while c.agent_ready_count(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "the upgraded agent never got ready"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(c.log_path("agent-node1.log")).unwrap_or_default();
    assert!(
        log.contains("LRU SNAT map") && log.contains("to=xlb_snat_lru_v2"),
        "{log}"
    );
    assert_eq!(
        snat_ports(&mut keep),
        old_ports,
        "a SNATed connection changed ports"
    );
    // New SNATed connections take ports of the new ranges (the old one is skipped while
    // its flows live).
    let fresh = c
        .client
        .enter(|| {
            (0..30)
                .filter_map(|_| echo::http_get(addr, T).ok())
                .filter(|a| ip_of(a) == node1)
                .map(|a| a.client.port())
                .collect::<Vec<u16>>()
        })
        .expect("netns");
    assert!(
        !fresh.is_empty() && fresh.iter().all(|p| (1024..=29999).contains(p)),
        "new SNATed connections after the upgrade: ports {fresh:?}\n{}",
        std::fs::read_to_string(c.log_path("agent-node1.log")).unwrap_or_default()
    );
    check_keepalives(&t, &mut keep);
}

/// `GET path` on 127.0.0.1:`port` inside `ns`: status and body.
fn local_get(ns: &Netns, port: u16, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let answer = ns
        .enter(|| -> std::io::Result<String> {
            let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
            let mut s = std::net::TcpStream::connect_timeout(&addr.into(), T)?;
            s.set_read_timeout(Some(T))?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("netns")
        .unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}{path}: {e}"));
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}
/// The value of the series written exactly as `series` in a metrics page (every series
/// read here is a count).
fn sample(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{page}"))
}

/// The agents serve kube-proxy's endpoints inside their node's namespace (127.0.0.1:10256
/// health, 127.0.0.1:10249 metrics): ready once synced and attached, NodePort traffic counted
/// by verdict, and the first sync's programming latency observed.
#[test]
fn metrics_and_health_endpoints_report_the_datapath() {
    if !privileged("metrics_and_health_endpoints_report_the_datapath") {
        return;
    }
    let t = tomcat6("metrics", 3);
    let node = &t.cluster.nodes[0].ns;
    assert_eq!(local_get(node, 10256, "/healthz").0, 200);
    let (status, body) = local_get(node, 10256, "/readyz");
    assert_eq!(status, 200, "not ready after answering NodePorts: {body}");
    // A new flow to the local pod is `nat_new`; one to a remote pod is `snat_tx` once the next
    // hop is resolved. 30 connections miss the local pod with probability (2/3)^30.
    let connections = 30;
    for _ in 0..connections {
        get(&t.cluster.client, t.node_port(0));
    }
    let (status, page) = local_get(node, 10249, "/metrics");
    assert_eq!(status, 200, "{page}");
    let nat_new = sample(&page, "xlb_datapath_packets_total{verdict=\"nat_new\"}");
    let snat_tx = sample(&page, "xlb_datapath_packets_total{verdict=\"snat_tx\"}");
    assert!(nat_new > 0, "no nat_new packet\n{page}");
    assert!(
        nat_new + snat_tx >= connections,
        "{connections} connections, {nat_new} nat_new and {snat_tx} snat_tx packets"
    );
    assert!(sample(&page, "xlb_datapath_bytes_total{verdict=\"nat_new\"}") > 0);
    // Every packet of those connections (both directions) counts for the Service.
    let svc = sample(
        &page,
        "xlb_service_packets_total{service=\"default/tomcat6\"}",
    );
    assert!(
        svc >= 2 * connections,
        "{svc} packets counted for default/tomcat6\n{page}"
    );
    assert!(sample(&page, "xlb_network_programming_duration_seconds_count") >= 1);
    assert!(sample(&page, "xlb_syncs_total") >= 1);
    assert_eq!(sample(&page, "xlb_sync_errors_total"), 0);
    assert_eq!(sample(&page, "xlb_attached_interfaces{hook=\"xdp\"}"), 1);
    assert_eq!(
        sample(&page, "xlb_attached_interfaces{hook=\"tc\"}"),
        1,
        "one pod per node"
    );
    assert_eq!(
        sample(&page, "xlb_attached_interfaces{hook=\"cgroup\"}"),
        1,
        "socket-level load balancing on the node's cgroup"
    );
    // tomcat6 has ClusterIP and NodePort (one node address) frontends, in two scopes each.
    assert_eq!(sample(&page, "xlb_map_entries{map=\"frontends\"}"), 4);
    assert_eq!(sample(&page, "xlb_map_entries{map=\"backends\"}"), 3);
    // Exposed from the start (the first sweep comes a minute after attaching).
    assert_eq!(sample(&page, "xlb_flow_table_overflowed_buckets"), 0);
    // That scrape started a walk of the flow table and the conntrack map; a later one
    // reports their counts (the flows are in the table, whose buckets are far from full).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = local_get(node, 10249, "/metrics").1;
        if page.contains("xlb_map_entries{map=\"flows\"}") {
            let flows = sample(&page, "xlb_map_entries{map=\"flows\"}");
            assert!(
                flows >= 1,
                "{connections} flows tracked, {flows} entries counted"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "conntrack never counted:\n{page}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// BPF host routing (`--host-routing bpf`): NodePort traffic to a pod of the node goes
/// straight into the pod, remote pods are reached as before, every client sees the same
/// answers and addresses as with the kernel's forwarding. Restarted without the option, the
/// agent detaches the NICs' TC program and the kernel forwards again, with no connection lost.
#[test]
fn bpf_host_routing_delivers_to_local_pods() {
    if !privileged("bpf_host_routing_delivers_to_local_pods") {
        return;
    }
    let t = Tomcat6::start(
        "hostrt",
        3,
        3,
        &xlb_bin(),
        &echo_bin(),
        &["--host-routing", "bpf"],
    )
    .expect("lab");
    t.wait_ready(Duration::from_secs(20)).expect("agents ready");
    let c = &t.cluster;
    let redirected = |node: usize| {
        let page = local_get(&c.nodes[node].ns, 10249, "/metrics").1;
        sample(
            &page,
            "xlb_datapath_events_total{event=\"host_routing_redirected\"}",
        )
    };
    let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
    for (i, node) in c.nodes.iter().enumerate() {
        for _ in 0..12 {
            let a = get(&c.client, t.node_port(i));
            let pod = c.pod(&a.pod).expect("known pod");
            let expected = if pod.node == i { CLIENT_IP } else { node.ip };
            assert_eq!(
                ip_of(&a),
                IpAddr::V4(expected),
                "{} via {}",
                a.pod,
                node.name
            );
            *by_pod.entry(a.pod).or_default() += 1;
        }
    }
    assert_eq!(by_pod.len(), 3, "not every pod answered: {by_pod:?}");
    assert!(redirected(0) > 0, "no packet went straight to a pod");
    let links = |node: usize| -> Vec<String> {
        std::fs::read_dir(c.pin_dir(node).join("links"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        links(0).iter().any(|l| l.starts_with("tcnic-eth0-")),
        "{:?}",
        links(0)
    );

    // Back to the kernel's forwarding, across a connection that stays open.
    let addr = t.node_port(0);
    let mut keep = keepalives(c, addr, 6);
    let syncs = c.agent_syncs(0);
    c.lab.kill(t.agents[0]);
    c.start_agent(0, &xlb_bin(), &[]).expect("restart");
    let deadline = Instant::now() + SYNC;
    while c.agent_syncs(0) <= syncs {
        assert!(
            Instant::now() < deadline,
            "the restarted agent never synced"
        );
        thread::sleep(Duration::from_millis(50));
    }
    wait_for_log(c, "agent-node1.log", "BPF host routing detached");
    assert!(
        !links(0).iter().any(|l| l.starts_with("tcnic-")),
        "{:?}",
        links(0)
    );
    check_keepalives(&t, &mut keep);
    let seen = new_connections(&t, addr, 30);
    assert_eq!(seen.values().sum::<usize>(), 30, "{seen:?}");
}

/// The bytes on the wire carry valid checksums, checked by recomputing them on frames
/// captured where they cross a wire: replies of a local pod to an outside client (packets
/// from a local socket, `CHECKSUM_PARTIAL`, rewritten by TC and finished by the NIC, which has
/// TX checksum offload off), replies of remote pods (rewritten by XDP), and a pod's requests
/// to a ClusterIP (rewritten by TC, leaving through the NIC).
#[test]
fn translated_packets_carry_valid_checksums_on_the_wire() {
    use xlb_tests::{capture::Capture, packet};
    if !privileged("translated_packets_carry_valid_checksums_on_the_wire") {
        return;
    }
    let t = tomcat6("csum", 3);
    let c = &t.cluster;
    lb_lab::run(
        c.client
            .command("ethtool")
            .args(["-K", "eth0", "gro", "off"]),
    )
    .expect("gro off");
    lb_lab::run(
        c.underlay
            .command("ethtool")
            .args(["-K", "n1", "gro", "off"]),
    )
    .expect("gro off");
    let addr = t.node_port(0);
    let tcp_from = |f: &[u8], src: Ipv4Addr, port: Option<u16>| {
        f.len() > 34
            && f[12..14] == [0x08, 0x00]
            && f[23] == 6
            && f[26..30] == src.octets()
            && port.is_none_or(|p| f[34..36] == p.to_be_bytes())
    };
    // Replies through node 1's NodePort, as the client receives them.
    let frames = thread::scope(|s| {
        let cap = s.spawn(|| {
            c.client
                .enter(|| {
                    let cap = Capture::open("eth0").expect("capture");
                    cap.collect(
                        Duration::from_secs(10),
                        |f| tcp_from(f, c.nodes[0].ip, Some(NODE_PORT)),
                        |f| f.len() >= 200,
                    )
                })
                .expect("netns")
        });
        thread::sleep(Duration::from_millis(200));
        c.client
            .enter(|| {
                for _ in 0..20 {
                    let _ = echo::download(addr, 20_000, T);
                }
            })
            .expect("netns");
        cap.join().expect("capture thread")
    });
    assert!(frames.len() >= 100, "captured only {} frames", frames.len());
    for f in &frames {
        if let Err(e) = packet::verify_checksums(f) {
            panic!("a NodePort reply left node1 with a bad checksum: {e}: {f:02x?}");
        }
    }
    // A pod's requests to the ClusterIP leave node 1 for remote pods.
    let me = &c.pods[0];
    let frames = thread::scope(|s| {
        let cap = s.spawn(|| {
            c.underlay
                .enter(|| {
                    let cap = Capture::open("n1").expect("capture");
                    cap.collect(
                        Duration::from_secs(10),
                        |f| tcp_from(f, me.ip, None),
                        |f| f.len() >= 40,
                    )
                })
                .expect("netns")
        });
        thread::sleep(Duration::from_millis(200));
        me.ns
            .enter(|| {
                for _ in 0..20 {
                    let _ = echo::http_get(SocketAddrV4::new(CLUSTER_IP, 80), T);
                }
            })
            .expect("netns");
        cap.join().expect("capture thread")
    });
    assert!(!frames.is_empty(), "no ClusterIP request left node1");
    for f in &frames {
        let p = packet::parse(f);
        assert_ne!(
            *p.dst.ip(),
            CLUSTER_IP,
            "an untranslated request left the node"
        );
        if let Err(e) = packet::verify_checksums(f) {
            panic!("a DNATted request left node1 with a bad checksum: {e}: {f:02x?}");
        }
    }
}

/// `--log-format json`: every line the agent writes is one JSON object with the level, the
/// target and the message (the fields a log collector indexes), and the agent still serves
/// the reference case.
#[test]
fn agent_logs_json_lines_for_log_collectors() {
    if !privileged("agent_logs_json_lines_for_log_collectors") {
        return;
    }
    let t = Tomcat6::start(
        "jsonlog",
        1,
        1,
        &xlb_bin(),
        &echo_bin(),
        &["--log-format", "json"],
    )
    .expect("lab");
    t.wait_ready(Duration::from_secs(20)).expect("agent ready");
    let c = &t.cluster;
    let answer = get(&c.client, SocketAddrV4::new(c.nodes[0].ip, NODE_PORT));
    assert_eq!(answer.pod, pod_name(0));
    let log = std::fs::read_to_string(c.log_path("agent-node1.log")).expect("agent log");
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(v["target"].is_string(), "no target: {line}");
        let message = v["fields"]["message"].as_str();
        messages.push(
            message
                .unwrap_or_else(|| panic!("no message: {line}"))
                .to_owned(),
        );
    }
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("ready: the first full sync")),
        "{messages:?}"
    );
}
