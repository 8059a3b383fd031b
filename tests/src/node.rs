//! A node namespace for runs through `BPF_PROG_TEST_RUN` that route (SNAT, BPF host routing):
//! `eth0` toward the world (192.168.50.11/24, gateway .1, node 2 at .12 routing the other
//! nodes' pod CIDRs 10.244.2.0/24 and 10.244.3.0/24), `lxc0` toward a local pod 10.244.1.5,
//! every neighbour resolved, IP forwarding on. Packet tests and the datapath benchmark run
//! there, so FIB lookups see these routes and nothing of the host's.
use lb_lab::{Lab, Netns};

/// MACs of the node's neighbours.
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x12];

/// The namespace (removed with the lab when dropped).
pub struct Node {
    _lab: Lab,
    pub ns: Netns,
}

impl Node {
    /// Builds the node under lab tag `tag`.
    pub fn new(tag: &str) -> lb_lab::Result<Self> {
        let lab = Lab::new(tag)?;
        let ns = lab.netns("node")?;
        let wire = lab.netns("wire")?;
        lb_lab::veth(&ns, "eth0", &wire, "up0", false)?;
        lb_lab::veth(&ns, "lxc0", &wire, "pod0", false)?;
        for args in [
            "addr add 192.168.50.11/24 dev eth0",
            "route add 10.244.2.0/24 via 192.168.50.12",
            "route add 10.244.3.0/24 via 192.168.50.12",
            "route add default via 192.168.50.1",
            "route add 10.244.1.5/32 dev lxc0",
            "neigh replace 192.168.50.1 lladdr 02:00:00:00:00:01 nud permanent dev eth0",
            "neigh replace 192.168.50.12 lladdr 02:00:00:00:00:12 nud permanent dev eth0",
            "neigh replace 10.244.1.5 lladdr 02:00:00:00:00:05 nud permanent dev lxc0",
        ] {
            ns.ip(args.split(' '))?;
        }
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Self { _lab: lab, ns })
    }
}

/// The index of interface `name` (call it on a thread inside the node's namespace).
#[must_use]
pub fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}
