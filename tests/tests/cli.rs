//! The inspection CLI against a real datapath: the datapath is loaded, its maps pinned under a
//! throwaway directory in bpffs, the tomcat6 Service programmed by the agent's programmer,
//! flows run through the NIC program (`BPF_PROG_TEST_RUN`), and the built `xlb` binary must
//! then report what the maps hold and predict what the datapath did.
//!
//! Cluster: Service tomcat6 (NodePort 32510, ClusterIP 10.96.0.10:80 → 8080, eTP=Cluster),
//! pods 10.244.1.5 (on this node), 10.244.2.5 and 10.244.3.5; this node is 192.168.50.11;
//! clients are 203.0.113.7:40000-40015. Run `cargo build -p lb-userspace --bin xlb` first (or
//! set `XLB_BIN`).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use lb_common::{CT_FORWARD, Verdict, map_names};
use lb_userspace::{
    control::{
        programmer::Programmer,
        state::{
            BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec,
            Proto, Scope, ServicePortRef,
        },
    },
    datapath::{
        loader::{self, Capacities},
        maps::AyaMaps,
    },
};
use serde_json::Value;
use xlb_tests::{
    harness::{Datapath, action::XDP_DROP},
    packet::{Frame, parse},
    privileged,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 11);
const NODE_PORT: u16 = 32510;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const PODS: [Ipv4Addr; 3] = [
    LOCAL_POD,
    Ipv4Addr::new(10, 244, 2, 5),
    Ipv4Addr::new(10, 244, 3, 5),
];
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const FLOWS: std::ops::Range<u16> = 40000..40016;

/// Every map of the datapath, pinned under `<dir>/<map name>` as the agent pins them.
const MAPS: [&str; 10] = [
    map_names::FRONTENDS,
    map_names::BACKENDS,
    map_names::RINGS,
    map_names::CONNTRACK,
    map_names::FLOWS,
    map_names::NAT,
    map_names::NAT_CURSORS,
    map_names::NAT_EXCLUDED,
    map_names::STATS,
    map_names::CONFIG,
];

/// A pin directory of this test in bpffs, removed with everything pinned in it when dropped
/// (a failing test included), which also frees the maps.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/sys/fs/bpf/xlb-test-{}-{n}", std::process::id()));
        // A leftover of a crashed run with the same pid would hold stale maps.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("creating {} (is bpffs mounted?): {e}", dir.display()));
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

/// The datapath with its maps pinned under `pins` (pinned before `AyaMaps` takes the writable
/// ones out of the object).
fn pinned_datapath(pins: &PinDir) -> Datapath {
    let caps = Capacities::small();
    let mut ebpf = loader::load(&caps).expect("loading the datapath");
    for name in MAPS {
        let path = pins.path().join(name);
        ebpf.map(name)
            .unwrap_or_else(|| panic!("map {name} missing"))
            .pin(&path)
            .unwrap_or_else(|e| panic!("pinning {}: {e}", path.display()));
    }
    let maps = AyaMaps::new(&mut ebpf).expect("datapath maps");
    Datapath {
        ebpf,
        maps,
        programmer: Programmer::new(&caps),
    }
}

/// tomcat6's TCP frontends (NodePort and ClusterIP, both scopes) over the three pods.
fn tomcat6() -> DesiredState {
    let backends: Vec<BackendSpec> = PODS
        .iter()
        .map(|ip| BackendSpec {
            addr: BackendAddr {
                addr: *ip,
                port: 8080,
                proto: Proto::Tcp,
            },
            local: *ip == LOCAL_POD,
        })
        .collect();
    let mut d = DesiredState::default();
    for scope in [Scope::External, Scope::Internal] {
        for (addr, port, kind) in [
            (NODE, NODE_PORT, FrontendKind::NodePort),
            (CLUSTER_IP, 80, FrontendKind::ClusterIp),
        ] {
            d.frontends.insert(
                FrontendAddr {
                    addr,
                    port,
                    proto: Proto::Tcp,
                    scope,
                },
                FrontendSpec {
                    service: ServicePortRef {
                        namespace: "default".into(),
                        name: "tomcat6".into(),
                        port_name: "".into(),
                    },
                    kind,
                    backends: backends.clone(),
                    snat_remote: true,
                    affinity_timeout_s: 0,
                },
            );
        }
    }
    d
}

/// The `xlb` binary (`XLB_BIN`, or the debug build of this workspace).
fn xlb_bin() -> PathBuf {
    let bin =
        std::env::var_os("XLB_BIN").map_or_else(|| xlb_tests::workspace_bin("xlb"), PathBuf::from);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p lb-userspace --bin xlb` first",
        bin.display()
    );
    bin
}

/// Runs `xlb <args> --pin-dir <pins>`; returns the output whatever the exit status.
fn xlb_raw(pins: &Path, args: &[&str]) -> Output {
    Command::new(xlb_bin())
        .args(args)
        .arg("--pin-dir")
        .arg(pins)
        .output()
        .expect("running xlb")
}

/// Runs `xlb <args>`, which must succeed; its stdout.
fn xlb(pins: &Path, args: &[&str]) -> String {
    let out = xlb_raw(pins, args);
    assert!(
        out.status.success(),
        "xlb {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    // Shown with --nocapture, and for a failing test.
    eprintln!("$ xlb {}\n{text}", args.join(" "));
    text
}

/// Runs `xlb <args> -o json`.
fn xlb_json(pins: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let text = xlb(pins, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("xlb {args:?}: {e}:\n{text}"))
}

fn addr(v: &Value) -> Ipv4Addr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address: {v}"))
}

fn endpoint(v: &Value) -> SocketAddrV4 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an address:port: {v}"))
}

/// `xlb explain` for a client of the NodePort from outside: its pick, as JSON.
fn explain_pick(pins: &Path, client: SocketAddrV4) -> Value {
    let target = format!("{NODE}:{NODE_PORT}/tcp");
    let from = client.to_string();
    let e = xlb_json(
        pins,
        &["explain", &target, "--from", &from, "--scope", "external"],
    );
    let scopes = e["scopes"].as_array().expect("scopes");
    assert_eq!(scopes.len(), 1, "{e}");
    scopes[0]["pick"].clone()
}

#[test]
fn cli_reports_what_the_datapath_holds_and_does() {
    if !privileged("cli_reports_what_the_datapath_holds_and_does") {
        return;
    }
    let pins = PinDir::new();
    let dir = pins.path();
    let mut dp = pinned_datapath(&pins);
    dp.program(&tomcat6());
    dp.set_snat(NODE, (61000, 61999));
    let clients: Vec<SocketAddrV4> = FLOWS.map(|p| SocketAddrV4::new(CLIENT, p)).collect();
    let predicted = explain_predicts_the_datapath(&mut dp, dir, &clients);
    service_list_shows_the_frontends(dir);
    backend_list_shows_the_pods(dir);
    stats_show_the_counters(dir, &dp);
    conntrack_list_shows_the_flows(dir, &clients, &predicted);
    explain_says_why(dir, clients[0], predicted[0]);
}

/// Before any packet, explain predicts each client's backend by Maglev; after the packets
/// ran through the NIC program, the datapath must have chosen exactly that, and explain then
/// reports the conntrack entry. Returns the predictions.
fn explain_predicts_the_datapath(
    dp: &mut Datapath,
    dir: &Path,
    clients: &[SocketAddrV4],
) -> Vec<SocketAddrV4> {
    let predicted: Vec<SocketAddrV4> = clients
        .iter()
        .map(|c| {
            let pick = explain_pick(dir, *c);
            assert_eq!(pick["outcome"], "new_flow", "{c}: {pick}");
            // A remote backend's new flow: SNATed, its backend's fill (none in use yet, the
            // whole range of 61000-61999 usable).
            if !pick["snat"].is_null() {
                assert_eq!(pick["snat"]["backend_ports_in_use"], 0, "{c}: {pick}");
                assert_eq!(pick["snat"]["backend_port_capacity"], 1000, "{c}: {pick}");
            }
            let b = &pick["backend"];
            SocketAddrV4::new(addr(&b["addr"]), b["port"].as_u64().expect("port") as u16)
        })
        .collect();
    assert!(
        predicted.iter().collect::<BTreeSet<_>>().len() > 1,
        "{} clients all predicted on one backend: {predicted:?}",
        clients.len()
    );

    // The flows through the NIC program. Local backends are DNATed and passed to the kernel;
    // remote ones are SNATed too and transmitted, or passed to the kernel when no neighbour
    // is known, or dropped when this host has no route: conntrack records the backend
    // chosen in every case.
    let mut sources = std::collections::BTreeMap::new();
    for (c, want) in clients.iter().zip(&predicted) {
        let out = dp.xdp(&Frame::tcp(*c, SocketAddrV4::new(NODE, NODE_PORT)).build());
        if out.action != XDP_DROP {
            let p = parse(&out.frame);
            assert_eq!(
                p.dst, *want,
                "{c}: the datapath DNATed elsewhere than explain predicted"
            );
            sources.insert(*c, p.src);
        }
    }
    assert!(
        sources.iter().any(|(c, s)| c == s),
        "no flow reached the local pod (unSNATed): {sources:?}"
    );
    let ct = dp.conntrack();
    for (c, want) in clients.iter().zip(&predicted) {
        let (_, entry) = ct
            .iter()
            .find(|(k, e)| {
                e.kind == CT_FORWARD
                    && k.src_be == u32::from_ne_bytes(c.ip().octets())
                    && u16::from_be(k.sport_be) == c.port()
            })
            .unwrap_or_else(|| panic!("{c}: no forward conntrack entry"));
        // Now conntrack decides, and explain says so.
        let pick = explain_pick(dir, *c);
        assert_eq!(pick["outcome"], "established", "{c}: {pick}");
        assert_eq!(
            endpoint(&pick["conntrack"]["backend"]),
            *want,
            "{c}: conntrack holds another backend than explain predicted"
        );
        assert_eq!(pick["backend"]["id"], entry.backend_id, "{c}");
        // The source the packet left with: the client's, or the SNAT that explain reports.
        match sources.get(c) {
            Some(src) if src == c => assert!(pick["snat"].is_null(), "{c}: {pick}"),
            Some(src) => {
                assert_eq!(addr(&pick["snat"]["addr"]), *src.ip(), "{c}: {pick}");
                assert_eq!(pick["snat"]["port"], src.port(), "{c}: {pick}");
                let used = pick["snat"]["backend_ports_in_use"].as_u64().unwrap_or(0);
                assert!(used >= 1, "{c}: its own port is not counted: {pick}");
            }
            None => {}
        }
    }
    predicted
}

fn service_list_shows_the_frontends(dir: &Path) {
    let text = xlb(dir, &["service", "list"]);
    for needle in [
        "192.168.50.11:32510/TCP".to_string(),
        "10.96.0.10:80/TCP".into(),
    ]
    .into_iter()
    .chain(PODS.iter().map(|p| format!("{p}:8080")))
    {
        assert!(text.contains(&needle), "{needle} missing from:\n{text}");
    }
    let services = xlb_json(dir, &["service", "list"]);
    let services = services.as_array().expect("a list");
    assert_eq!(services.len(), 4, "2 frontends × 2 scopes");
    let np = services
        .iter()
        .find(|s| addr(&s["addr"]) == NODE && s["scope"] == "external")
        .expect("the external NodePort frontend");
    assert_eq!(np["port"], NODE_PORT);
    assert_eq!(np["proto"], "TCP");
    assert_eq!(np["flags"], serde_json::json!(["SNAT"]));
    let members = np["backends"].as_array().expect("backends");
    let got: BTreeSet<Ipv4Addr> = members
        .iter()
        .map(|m| addr(&m["backend"]["addr"]))
        .collect();
    assert_eq!(got, PODS.into_iter().collect::<BTreeSet<_>>());
    let slots: u64 = members.iter().filter_map(|m| m["slots"].as_u64()).sum();
    assert_eq!(
        Some(slots),
        np["ring_size"].as_u64(),
        "the ring's slots add up"
    );
    for m in members {
        let local = addr(&m["backend"]["addr"]) == LOCAL_POD;
        assert_eq!(m["backend"]["local"], local, "{m}");
    }
}

fn backend_list_shows_the_pods(dir: &Path) {
    let backends = xlb_json(dir, &["backend", "list"]);
    let backends = backends.as_array().expect("a list");
    assert_eq!(backends.len(), 3, "{backends:?}");
    assert_eq!(
        backends.iter().filter(|b| b["local"] == true).count(),
        1,
        "{backends:?}"
    );
    assert!(xlb(dir, &["backend", "list"]).contains("10.244.1.5:8080"));
}

/// What the NIC program counted, as the harness reads it.
fn stats_show_the_counters(dir: &Path, dp: &Datapath) {
    let stats = xlb_json(dir, &["stats"]);
    let count = |verdict: Verdict| {
        stats
            .as_array()
            .expect("a list")
            .iter()
            .find(|s| s["verdict"] == verdict.name())
            .and_then(|s| s["packets"].as_u64())
            .unwrap_or_else(|| panic!("no {} in {stats}", verdict.name()))
    };
    assert!(count(Verdict::NatNew) >= 1);
    assert_eq!(count(Verdict::NatNew), dp.count(Verdict::NatNew));
    assert_eq!(count(Verdict::DropNoRoute), dp.count(Verdict::DropNoRoute));
    assert!(xlb(dir, &["stats"]).contains("nat_new"));
}

/// The first client's forward entry, filtered by source; by backend; limited.
fn conntrack_list_shows_the_flows(
    dir: &Path,
    clients: &[SocketAddrV4],
    predicted: &[SocketAddrV4],
) {
    let first = clients[0].to_string();
    let entries = xlb_json(dir, &["conntrack", "list", "--src", &first]);
    let entries = entries.as_array().expect("a list");
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(e["kind"], "forward");
    assert_eq!(e["proto"], "TCP");
    assert_eq!(e["src"], first);
    assert_eq!(endpoint(&e["dst"]), SocketAddrV4::new(NODE, NODE_PORT));
    assert_eq!(endpoint(&e["backend"]), predicted[0]);
    let text = xlb(dir, &["conntrack", "list", "--src", &first]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("forward") && l.contains(&first)),
        "{text}"
    );
    // By backend: every entry names the local pod; a limit stops the scan.
    let local = xlb_json(dir, &["conntrack", "list", "--backend", "10.244.1.5"]);
    let local = local.as_array().expect("a list");
    assert!(!local.is_empty());
    assert!(
        local
            .iter()
            .all(|e| endpoint(&e["backend"]).ip() == &LOCAL_POD)
    );
    let limited = xlb_raw(dir, &["conntrack", "list", "--limit", "1", "-o", "json"]);
    assert!(limited.status.success());
    let limited: Value = serde_json::from_slice(&limited.stdout).expect("JSON");
    assert_eq!(limited.as_array().map(Vec::len), Some(1));
}

/// Explain in words: the frontend, the why, the client's backend.
fn explain_says_why(dir: &Path, client: SocketAddrV4, backend: SocketAddrV4) {
    let text = xlb(
        dir,
        &[
            "explain",
            &format!("{NODE}:{NODE_PORT}/tcp"),
            "--from",
            &client.to_string(),
        ],
    );
    let backend = backend.to_string();
    for needle in [
        "external scope",
        "internal scope",
        "externalTrafficPolicy=Cluster",
        "→ backend",
        &backend,
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn cli_names_a_missing_pin_dir_in_one_line() {
    if !privileged("cli_names_a_missing_pin_dir_in_one_line") {
        return;
    }
    let missing = format!("/sys/fs/bpf/xlb-test-{}-missing", std::process::id());
    for args in [
        &["service", "list"][..],
        &["backend", "list"],
        &["conntrack", "list"],
        &["stats"],
        &["explain", "10.96.0.10:80/tcp"],
    ] {
        let out = xlb_raw(Path::new(&missing), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.contains(&missing) && err.contains("agent running"),
            "{args:?}: {err}"
        );
    }
    // A directory without the maps names the first missing map.
    let pins = PinDir::new();
    let out = xlb_raw(pins.path(), &["stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains(map_names::FRONTENDS) && err.contains(&pins.path().display().to_string()),
        "{err}"
    );
}

/// `xlb completions <shell>` prints a script that shell loads, naming xlb's subcommands and
/// flags; no pinned datapath or privilege is needed.
#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _xlb"),
        ("zsh", "#compdef xlb"),
        ("fish", "complete -c xlb"),
    ] {
        let out = Command::new(xlb_bin())
            .args(["completions", shell])
            .output()
            .expect("running xlb");
        assert!(out.status.success(), "xlb completions {shell}");
        let script = String::from_utf8(out.stdout).expect("UTF-8 script");
        assert!(script.contains(marker), "{shell}: no `{marker}`:\n{script}");
        // Fish names long options without their dashes.
        for word in ["explain", "conntrack", "pin-dir", "log-format"] {
            assert!(script.contains(word), "{shell}: `{word}` missing");
        }
    }
    let out = Command::new(xlb_bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("running xlb");
    assert!(!out.status.success(), "an unknown shell is refused");
}
