//! `cargo xtask demo`: until the lab's tomcat6 case lands, the demo proves the datapath loads
//! and attaches: it builds xlb, makes a throwaway network namespace with a veth pair, attaches
//! the XDP program to one end and the TC program to the other, reports, and removes it all.
use lb_lab::{Lab, veth};

use crate::{build_release, run, setup, xlb_release};

pub fn run_demo() -> anyhow::Result<()> {
    setup::ensure()?;
    println!("demo: building xlb (release) with its embedded eBPF datapath");
    build_release()?;
    let lab = Lab::new("demo")?;
    let node = lab.netns("node")?;
    println!(
        "demo: created network namespace {} (the host's namespace is not touched)",
        node.name()
    );
    veth(&node, "eth0", &node, "lxc0", true)?;
    println!(
        "demo: created veth pair eth0 (plays the node NIC) <-> lxc0 (plays a pod's host side)"
    );
    run(node.command(xlb_release()).args([
        "datapath",
        "probe",
        "--nic",
        "eth0",
        "--pod-iface",
        "lxc0",
    ]))?;
    drop(lab);
    println!("demo: removed the namespace; nothing is left behind");
    Ok(())
}
