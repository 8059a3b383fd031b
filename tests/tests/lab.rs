//! Lab tests: xlb run in network namespaces the test creates, with real interfaces.
use std::path::PathBuf;

use lb_lab::{Lab, veth};
use xlb_tests::privileged;

/// The `xlb` binary built by `cargo xtask test`'s ebpf-build stage (or `XLB_BIN`).
fn xlb_bin() -> PathBuf {
    std::env::var_os("XLB_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/xlb"),
        PathBuf::from,
    )
}

#[test]
fn datapath_attaches_to_nic_and_pod_interfaces() {
    if !privileged("datapath_attaches_to_nic_and_pod_interfaces") {
        return;
    }
    let lab = Lab::new("att").expect("lab");
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
        "xlb datapath probe failed: {}",
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
    // Dropping the links detached everything: no XDP program is left on the NIC.
    let link = node.ip(["-d", "link", "show", "eth0"]).expect("ip link");
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "XDP left attached"
    );
}
