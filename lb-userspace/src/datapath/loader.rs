//! Loading the embedded datapath object and attaching its programs to interfaces, optionally
//! pinned (see `pin`): pinned maps are reused by the next load, and a pinned attachment is
//! taken over by the next agent with an atomic program replacement (`bpf_link_update`), so
//! traffic never sees an interface without the datapath.
use std::{
    fs, io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpMode,
    },
};
use lb_common::{capacity, map_names};

use crate::datapath::pin;

/// The datapath object, built by build.rs from lb-ebpf.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-datapath"));

/// Program names in the object.
pub const PROG_NIC: &str = "xlb_nic";
/// The NIC's new-flow program, which `xlb_nic` tail-calls (`lb_common::PROG_INDEX_NIC_NEW`).
pub const PROG_NIC_NEW: &str = "xlb_nic_new";
/// The pod interfaces' new-flow program (`lb_common::PROG_INDEX_POD_NEW`).
pub const PROG_POD_NEW: &str = "xlb_pod_new";
pub const PROG_POD: &str = "xlb_pod";
/// The NIC's TC ingress program of BPF host routing (attached only with it).
pub const PROG_NIC_INGRESS: &str = "xlb_nic_ingress";
/// The benchmark floor (an XDP program that only returns `XDP_PASS`). [`load`] leaves it out:
/// only the benchmark loads it, through [`floor_program`].
pub const PROG_FLOOR: &str = "xlb_noop";
/// Socket-level load balancing (cgroup socket-address hooks), loaded only when attached.
pub const PROGS_SOCK: [&str; 8] = [
    "xlb_connect4",
    "xlb_sendmsg4",
    "xlb_recvmsg4",
    "xlb_getpeername4",
    "xlb_connect6",
    "xlb_sendmsg6",
    "xlb_recvmsg6",
    "xlb_getpeername6",
];
/// Forgets a connected socket's translation as the socket closes (a cgroup `sock_release`
/// hook), attached with [`PROGS_SOCK`].
pub const PROG_SOCK_RELEASE: &str = "xlb_sock_release";
/// Pinned links of the socket hooks start with this (interface links with their hook name).
const SOCK_LINK_PREFIX: &str = "sock-";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("this xlb was built without its datapath (AYA_BUILD_SKIP); rebuild without it")]
    NoDatapath,
    #[error("loading the datapath into the kernel failed")]
    Load(#[source] aya::EbpfError),
    #[error("map {0} is missing from the datapath object")]
    MissingMap(&'static str),
    #[error("program {0} is missing from the datapath object")]
    MissingProgram(&'static str),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} (for socket-level load balancing): {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the pinned {0} has {1} buckets, not a power of two: not this xlb's (run `xlb \
         cleanup` to start afresh)"
    )]
    BucketTable(&'static str, u32),
    #[error("filling the program table: {0}")]
    ProgramTable(String),
    #[error("pinned link {path}: {message}")]
    Link { path: PathBuf, message: String },
}

/// Every map of the datapath, by name.
pub const MAP_NAMES: [&str; 20] = [
    map_names::FRONTENDS,
    map_names::BACKENDS,
    map_names::RINGS,
    map_names::CONNTRACK,
    map_names::NAT,
    map_names::NAT_CURSORS,
    map_names::NAT_EXCLUDED,
    map_names::SNAT_LEGACY,
    map_names::STATS,
    map_names::SERVICE_STATS,
    map_names::CONFIG,
    map_names::SOCK_REVNAT,
    map_names::AFFINITY,
    map_names::EVENTS,
    map_names::SOCK_NETNS,
    map_names::FLOWS,
    map_names::POD_IFACES,
    map_names::HOST_ROUTING,
    map_names::NIC_PROGRAMS,
    map_names::POD_PROGRAMS,
];

/// Map capacities, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub frontends: u32,
    pub backends: u32,
    pub ring_slots: u32,
    pub conntrack: u32,
    /// SNAT table buckets (3 SNATed flows each); rounded up to a power of two at load.
    pub nat_buckets: u32,
    /// Flow table buckets (3 flows each); rounded up to a power of two at load.
    pub flow_buckets: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            frontends: capacity::FRONTENDS,
            backends: capacity::BACKENDS,
            ring_slots: capacity::RING_SLOTS,
            conntrack: capacity::CONNTRACK,
            nat_buckets: capacity::NAT_BUCKETS,
            flow_buckets: capacity::FLOW_BUCKETS,
        }
    }
}

impl Capacities {
    /// Small maps for tests, which load many copies of the datapath.
    #[must_use]
    pub const fn small() -> Self {
        Self {
            frontends: 1024,
            backends: 4096,
            ring_slots: 65_536,
            conntrack: 16_384,
            nat_buckets: 4096,
            flow_buckets: 4096,
        }
    }
}

/// How frames translated to a pod of this node reach it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostRouting {
    /// The kernel forwards them (routing, netfilter's FORWARD chain), as with kube-proxy.
    #[default]
    Kernel,
    /// The datapath hands them to the pod's interface itself (`bpf_redirect_peer` from the
    /// NIC's TC ingress): faster, but the node's netfilter does not see them, so a network
    /// policy enforced there (e.g. by a CNI's iptables rules) does not apply to them.
    Bpf,
}

/// Loads the embedded datapath with the given capacities (programs loaded, not attached).
pub fn load(caps: &Capacities) -> Result<Ebpf, LoaderError> {
    load_with(caps, None, HostRouting::Kernel)
}

/// [`load`] with a choice of host routing.
pub fn load_routing(caps: &Capacities, routing: HostRouting) -> Result<Ebpf, LoaderError> {
    load_with(caps, None, routing)
}

/// Which pinned maps a load found and reused.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub maps: Vec<&'static str>,
}

/// Loads the datapath with its maps pinned under `dir` (created with mode 0700): maps already
/// pinned there are reused with their contents (and their capacities), missing ones are
/// created and pinned. Returns which maps were reused.
pub fn load_pinned(
    caps: &Capacities,
    dir: &Path,
    routing: HostRouting,
) -> Result<(Ebpf, Adopted), LoaderError> {
    let pin_err = |source| LoaderError::PinDir {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(pin::links_dir(dir)).map_err(pin_err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(pin_err)?;
    // A load after `xlb cleanup`: the operator wants xlb again.
    let _ = fs::remove_dir(pin::cleanup_mark(dir));
    let adopted = Adopted {
        maps: MAP_NAMES
            .into_iter()
            .filter(|n| pin::map_path(dir, n).exists())
            .collect(),
    };
    Ok((load_with(caps, Some(dir), routing)?, adopted))
}

fn load_with(
    caps: &Capacities,
    pin_dir: Option<&Path>,
    routing: HostRouting,
) -> Result<Ebpf, LoaderError> {
    if DATAPATH.is_empty() {
        return Err(LoaderError::NoDatapath);
    }
    let paths: Vec<(&str, PathBuf)> = pin_dir
        .map(|d| {
            MAP_NAMES
                .iter()
                .map(|n| (*n, pin::map_path(d, n)))
                .collect()
        })
        .unwrap_or_default();
    let buckets = flow_buckets(caps.flow_buckets);
    let nat_buckets = flow_buckets(caps.nat_buckets);
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(map_names::FRONTENDS, caps.frontends)
        .map_max_entries(map_names::BACKENDS, caps.backends)
        .map_max_entries(map_names::NAT_CURSORS, caps.backends)
        .map_max_entries(
            map_names::RINGS,
            caps.ring_slots.div_ceil(lb_common::RING_LANES),
        )
        .map_max_entries(map_names::SERVICE_STATS, caps.frontends)
        .map_max_entries(map_names::CONNTRACK, caps.conntrack)
        .map_max_entries(map_names::NAT, nat_buckets)
        .map_max_entries(map_names::FLOWS, buckets);
    // The datapath masks its bucket hashes with these; each must match its map's size, which
    // is the pinned map's own when one is reused.
    let mask = |map: &'static str, requested: u32| -> Result<u32, LoaderError> {
        let pinned = pinned_entries(&paths, map);
        if let Some(n) = pinned.filter(|n| !n.is_power_of_two()) {
            return Err(LoaderError::BucketTable(map, n));
        }
        Ok(pinned.unwrap_or(requested) - 1)
    };
    let flow_mask = mask(map_names::FLOWS, buckets)?;
    let nat_mask = mask(map_names::NAT, nat_buckets)?;
    loader.override_global(FLOW_BUCKET_MASK, &flow_mask, true);
    loader.override_global(NAT_BUCKET_MASK, &nat_mask, true);
    let bpf_routing = u32::from(routing == HostRouting::Bpf);
    loader.override_global(HOST_ROUTING_BPF, &bpf_routing, true);
    let mut ebpf = loader.load(DATAPATH).map_err(LoaderError::Load)?;
    xdp_program(&mut ebpf)?.load_retrying(PROG_NIC)?;
    // The new-flow programs the NIC and pod programs tail-call. A pinned table of a previous
    // agent gets this agent's programs at once (same layout version: the same maps).
    let nic_new: &mut Xdp = ebpf
        .program_mut(PROG_NIC_NEW)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_NIC_NEW))?;
    nic_new.load_retrying(PROG_NIC_NEW)?;
    let nic_new = nic_new
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| LoaderError::Program(PROG_NIC_NEW, e))?;
    let pod_new: &mut SchedClassifier = ebpf
        .program_mut(PROG_POD_NEW)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_POD_NEW))?;
    pod_new.load_retrying(PROG_POD_NEW)?;
    let pod_new = pod_new
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(|e| LoaderError::Program(PROG_POD_NEW, e))?;
    for (table, index, fd) in [
        (
            map_names::NIC_PROGRAMS,
            lb_common::PROG_INDEX_NIC_NEW,
            &nic_new,
        ),
        (
            map_names::POD_PROGRAMS,
            lb_common::PROG_INDEX_POD_NEW,
            &pod_new,
        ),
    ] {
        let mut programs: aya::maps::ProgramArray<&mut aya::maps::MapData> = ebpf
            .map_mut(table)
            .and_then(|m| aya::maps::ProgramArray::try_from(m).ok())
            .ok_or(LoaderError::MissingMap(table))?;
        programs
            .set(index, fd, 0)
            .map_err(|e| LoaderError::ProgramTable(format!("{table}: {e}")))?;
    }
    tc_program(&mut ebpf)?.load_retrying(PROG_POD)?;
    if routing == HostRouting::Bpf {
        nic_ingress_program(&mut ebpf)?.load_retrying(PROG_NIC_INGRESS)?;
    }
    Ok(ebpf)
}

/// The datapath's global that turns BPF host routing on.
const HOST_ROUTING_BPF: &str = "HOST_ROUTING_BPF";

/// The datapath's global holding the flow table's bucket mask.
const FLOW_BUCKET_MASK: &str = "FLOW_BUCKET_MASK";
/// The datapath's global holding the SNAT table's bucket mask.
const NAT_BUCKET_MASK: &str = "NAT_BUCKET_MASK";

/// The flow table's bucket count for a requested one: a power of two, at least 1.
#[must_use]
pub fn flow_buckets(requested: u32) -> u32 {
    requested
        .max(1)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The size of map `name` if it is pinned among `paths`.
fn pinned_entries(paths: &[(&str, PathBuf)], name: &str) -> Option<u32> {
    let (_, path) = paths.iter().find(|(n, _)| *n == name)?;
    if !path.exists() {
        return None;
    }
    let info = aya::maps::MapData::from_pin(path).ok()?.info().ok()?;
    Some(info.max_entries())
}

pub fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoaderError> {
    ebpf.program_mut(PROG_NIC)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_NIC))
}

pub fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoaderError> {
    ebpf.program_mut(PROG_POD)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_POD))
}

/// The NIC's TC ingress program (BPF host routing).
pub fn nic_ingress_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, LoaderError> {
    ebpf.program_mut(PROG_NIC_INGRESS)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_NIC_INGRESS))
}

/// The benchmark floor program of a loaded datapath (not loaded into the kernel by [`load`]).
pub fn floor_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoaderError> {
    ebpf.program_mut(PROG_FLOOR)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_FLOOR))
}

/// Attaches the NIC program (XDP, native mode) to `iface`.
pub fn attach_nic(ebpf: &mut Ebpf, iface: &str) -> Result<(), LoaderError> {
    xdp_program(ebpf)?
        .attach(iface, XdpMode::Driver)
        .map_err(|e| LoaderError::Program(PROG_NIC, e))?;
    Ok(())
}

/// How an interface got the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// A new attachment, now pinned.
    Attached,
    /// A pinned attachment of a previous agent, whose program was replaced atomically.
    Replaced,
}

fn link_pin_path(dir: &Path, hook: &str, iface: &str, ifindex: u32) -> PathBuf {
    pin::links_dir(dir).join(format!("{hook}-{iface}-{ifindex}"))
}

fn ifindex(iface: &str) -> Option<u32> {
    let c = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Opens the pinned link at `path`, if there is one.
fn pinned_link(path: &Path) -> Result<Option<FdLink>, LoaderError> {
    match PinnedLink::from_pin(path) {
        Ok(l) => Ok(Some(FdLink::from(l))),
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoaderError::Link {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

fn pin_new_link(path: &Path, link: FdLink) -> Result<(), LoaderError> {
    link.pin(path).map(drop).map_err(|e| LoaderError::Link {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Attaches the NIC program to `iface`, pinned under `dir`; takes over a pinned attachment.
pub fn attach_nic_pinned(
    ebpf: &mut Ebpf,
    iface: &str,
    dir: &Path,
) -> Result<(Attachment, HeldLink), LoaderError> {
    let path = link_pin_path(dir, "xdp", iface, existing_ifindex(iface)?);
    let prog = xdp_program(ebpf)?;
    attach_pinned(&path, PROG_NIC, |old| {
        let id = match old {
            Some(link) => prog.attach_to_link(link)?,
            None => prog.attach(iface, XdpMode::Driver)?,
        };
        prog.take_link(id)
    })
}

/// Pinned links of the NIC's TC ingress program (BPF host routing) start with this.
const NIC_INGRESS_HOOK: &str = "tcnic";

/// Attaches the NIC's TC ingress program (BPF host routing) to `iface`, pinned under `dir`;
/// takes over a pinned attachment.
pub fn attach_nic_ingress_pinned(
    ebpf: &mut Ebpf,
    iface: &str,
    dir: &Path,
) -> Result<(Attachment, HeldLink), LoaderError> {
    let path = link_pin_path(dir, NIC_INGRESS_HOOK, iface, existing_ifindex(iface)?);
    attach_tc_ingress_pinned(nic_ingress_program(ebpf)?, PROG_NIC_INGRESS, iface, &path)
}

/// Attaches a TC program to `iface`'s ingress (tcx), pinned at `path`; takes over a pinned
/// attachment.
fn attach_tc_ingress_pinned(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    path: &Path,
) -> Result<(Attachment, HeldLink), LoaderError> {
    attach_pinned(path, name, |old| {
        let id = match old {
            Some(link) => prog.attach_to_link(link)?,
            None => prog.attach(iface, TcAttachType::Ingress)?,
        };
        prog.take_link(id)
    })
}

/// Removes the pinned TC ingress links of NICs under `dir` (which detaches them): BPF host
/// routing is off. Returns their names.
#[must_use]
pub fn remove_nic_ingress_links(dir: &Path) -> Vec<String> {
    remove_links(dir, &format!("{NIC_INGRESS_HOOK}-"))
}

/// Removes the pinned links under `dir` whose names start with `prefix` (which detaches
/// them); returns their names.
fn remove_links(dir: &Path, prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir(pin::links_dir(dir)) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && fs::remove_file(e.path()).is_ok() {
                removed.push(name);
            }
        }
    }
    removed
}

/// Attaches the socket-level load-balancing programs to the cgroup (v2) directory `cgroup`,
/// pinned under `dir`: `connect()`/`sendmsg()` of the cgroup's processes to a frontend go to a
/// backend. Link attachments let other programs run too, so a previous agent's pinned
/// ones are taken over by attaching first and then dropping the old link (the new pin is
/// renamed over the old one): no call goes untranslated in between, and while both run the
/// second sees a backend's address, which is no frontend, and leaves it.
pub fn attach_sock_pinned(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    dir: &Path,
) -> Result<(Attachment, Vec<HeldLink>), LoaderError> {
    let cgroup_err = |source| LoaderError::Cgroup {
        path: cgroup.to_owned(),
        source,
    };
    let cg = fs::File::open(cgroup).map_err(cgroup_err)?;
    // The programs translate the sockets of this (the host's) network namespace only.
    let cookie = own_netns_cookie().map_err(cgroup_err)?;
    let mut netns: aya::maps::Array<_, u64> = ebpf
        .map_mut(map_names::SOCK_NETNS)
        .and_then(|m| aya::maps::Array::try_from(m).ok())
        .ok_or(LoaderError::MissingMap(map_names::SOCK_NETNS))?;
    netns.set(0, cookie, 0).map_err(|e| LoaderError::Cgroup {
        path: cgroup.to_owned(),
        source: io::Error::other(e),
    })?;
    let mut replaced = false;
    // Load all nine before attaching any: a program the kernel refuses must not leave the
    // others attached while the agent reports the socket hooks as not attached.
    for name in PROGS_SOCK {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoaderError::MissingProgram(name))?;
        if prog.fd().is_err() {
            prog.load_retrying(name)?;
        }
    }
    let release: &mut CgroupSock = ebpf
        .program_mut(PROG_SOCK_RELEASE)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_SOCK_RELEASE))?;
    if release.fd().is_err() {
        release.load_retrying(PROG_SOCK_RELEASE)?;
    }
    let mut held = Vec::with_capacity(PROGS_SOCK.len() + 1);
    for name in PROGS_SOCK {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoaderError::MissingProgram(name))?;
        let link = prog
            // A link attachment always lets others run too (the kernel takes no flags).
            .attach(&cg, CgroupAttachMode::Single)
            .and_then(|id| prog.take_link(id))
            .map_err(|e| LoaderError::Program(name, e))?;
        held.push(pin_sock_link(dir, name, link, &mut replaced)?);
    }
    let release: &mut CgroupSock = ebpf
        .program_mut(PROG_SOCK_RELEASE)
        .and_then(|p| p.try_into().ok())
        .ok_or(LoaderError::MissingProgram(PROG_SOCK_RELEASE))?;
    let link = release
        .attach(&cg, CgroupAttachMode::Single)
        .and_then(|id| release.take_link(id))
        .map_err(|e| LoaderError::Program(PROG_SOCK_RELEASE, e))?;
    held.push(pin_sock_link(dir, PROG_SOCK_RELEASE, link, &mut replaced)?);
    let how = if replaced {
        Attachment::Replaced
    } else {
        Attachment::Attached
    };
    Ok((how, held))
}

/// Pins the link of socket hook `name` under `dir` (renamed over a previous agent's pin, which
/// detaches that one) and returns it held; `replaced` is set when there was one.
fn pin_sock_link<L>(
    dir: &Path,
    name: &str,
    link: L,
    replaced: &mut bool,
) -> Result<HeldLink, LoaderError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let path = pin::links_dir(dir).join(format!("{SOCK_LINK_PREFIX}{name}"));
    // bpffs names take no dots.
    let fresh = pin::links_dir(dir).join(format!("{SOCK_LINK_PREFIX}{name}-new"));
    let _ = fs::remove_file(&fresh);
    let link = FdLink::try_from(link).map_err(|e| LoaderError::Link {
        path: path.clone(),
        message: e.to_string(),
    })?;
    pin_new_link(&fresh, link)?;
    *replaced |= path.exists();
    fs::rename(&fresh, &path).map_err(|source| LoaderError::PinDir {
        path: path.clone(),
        source,
    })?;
    HeldLink::open(&path)
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, Linux ≥ 5.14).
fn own_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64 that outlives the call.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if r == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes the pinned socket-level load-balancing links under `dir` (which detaches them);
/// returns their names.
#[must_use]
pub fn remove_sock_links(dir: &Path) -> Vec<String> {
    remove_links(dir, SOCK_LINK_PREFIX)
}

/// Attaches the pod program to `iface`'s ingress, pinned under `dir`; takes over a pinned
/// attachment.
pub fn attach_pod_pinned(
    ebpf: &mut Ebpf,
    iface: &str,
    dir: &Path,
) -> Result<(Attachment, HeldLink), LoaderError> {
    let path = link_pin_path(dir, "tc", iface, existing_ifindex(iface)?);
    attach_tc_ingress_pinned(tc_program(ebpf)?, PROG_POD, iface, &path)
}

fn existing_ifindex(iface: &str) -> Result<u32, LoaderError> {
    ifindex(iface).ok_or_else(|| LoaderError::Link {
        path: PathBuf::from(iface),
        message: "no such interface".into(),
    })
}

/// The attach-or-take-over logic of both hooks. `attach` gets the pinned link of a previous
/// agent (`Some`: replace its program in place) or nothing (attach anew), and returns the link
/// taken from the program; a new one is then pinned at `path`. Either way the agent keeps the
/// link's descriptor (see [`HeldLink`]), and the program keeps none: letting the held link go
/// with its pin removed detaches it.
fn attach_pinned<L>(
    path: &Path,
    prog: &'static str,
    attach: impl FnOnce(Option<L>) -> Result<L, aya::programs::ProgramError>,
) -> Result<(Attachment, HeldLink), LoaderError>
where
    L: TryFrom<FdLink, Error = LinkError>,
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link_err = |e: LinkError| LoaderError::Link {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let old = pinned_link(path)?
        .map(L::try_from)
        .transpose()
        .map_err(link_err)?;
    let replaced = old.is_some();
    let link = attach(old).map_err(|e| LoaderError::Program(prog, e))?;
    let fd = FdLink::try_from(link).map_err(link_err)?;
    let (how, fd) = if replaced {
        (Attachment::Replaced, fd)
    } else {
        let pinned = fd.pin(path).map_err(|e| LoaderError::Link {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        (Attachment::Attached, FdLink::from(pinned))
    };
    Ok((
        how,
        HeldLink {
            path: path.to_owned(),
            fd: Some(fd),
        },
    ))
}

/// An attachment's link as the running agent holds it: where it is pinned, and a descriptor
/// of the agent's own. The pin keeps the attachment across agent restarts; the descriptor
/// keeps it while the agent runs even if the pin is removed (`rm -r` of the pin directory
/// would otherwise detach the datapath at once), so that [`repair_pins`] can pin it again
/// with no moment without the datapath.
#[derive(Debug)]
pub struct HeldLink {
    path: PathBuf,
    /// None only after pinning it again failed (the attachment ended with it).
    fd: Option<FdLink>,
}

impl HeldLink {
    fn open(path: &Path) -> Result<Self, LoaderError> {
        let fd = pinned_link(path)?.ok_or_else(|| LoaderError::Link {
            path: path.to_owned(),
            message: "the link just pinned is not there".into(),
        })?;
        Ok(Self {
            path: path.to_owned(),
            fd: Some(fd),
        })
    }

    /// Where this link is pinned.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The attachment still exists (its descriptor was not lost to a failed re-pin).
    #[must_use]
    pub fn is_held(&self) -> bool {
        self.fd.is_some()
    }
}

/// The kernel ids of the running datapath's maps, by name, taken at load (the agent then
/// moves the maps into its typed writers): what [`repair_pins`] opens them by.
#[derive(Clone, Debug, Default)]
pub struct MapIds(Vec<(&'static str, u32)>);

impl MapIds {
    /// The ids of the maps pinned under `dir` (just loaded there by [`load_pinned`]).
    pub fn of(dir: &Path) -> Result<Self, LoaderError> {
        MAP_NAMES
            .into_iter()
            .map(|name| {
                let path = pin::map_path(dir, name);
                let id = aya::maps::MapData::from_pin(&path)
                    .and_then(|m| m.info())
                    .map_err(|e| LoaderError::Link {
                        path: path.clone(),
                        message: e.to_string(),
                    })?
                    .id();
                Ok((name, id))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// What [`repair_pins`] pinned again.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    pub maps: Vec<&'static str>,
    pub links: Vec<PathBuf>,
}

impl Repaired {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.links.is_empty()
    }
}

/// Whether a pin of the running datapath is missing under `dir`: a map's, or one of `links`'.
/// Cheap (one `stat` per pin): called every few seconds.
#[must_use]
pub fn pins_missing<'a>(dir: &Path, links: impl IntoIterator<Item = &'a HeldLink>) -> bool {
    MAP_NAMES.iter().any(|n| !pin::map_path(dir, n).exists())
        || links.into_iter().any(|l| l.is_held() && !l.path.exists())
}

/// Pins again what was removed from under a running agent: the directory itself (mode 0700),
/// every map of `ebpf` whose pin is gone (the agent's descriptors kept the maps and their
/// contents alive), and every link of `links` whose pin is gone. Maps first: an agent
/// started meanwhile must find the running datapath's state, not make a new one. A link that
/// cannot be pinned again is reported in the error and is lost with its descriptor.
pub fn repair_pins(
    maps: &MapIds,
    dir: &Path,
    links: &mut [&mut HeldLink],
) -> Result<Repaired, LoaderError> {
    let pin_err = |source| LoaderError::PinDir {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(pin::links_dir(dir)).map_err(pin_err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(pin_err)?;
    let mut repaired = Repaired::default();
    for &(name, id) in &maps.0 {
        let path = pin::map_path(dir, name);
        if path.exists() {
            continue;
        }
        let pin_error = |message: String| LoaderError::Link {
            path: path.clone(),
            message,
        };
        let map = aya::maps::MapData::from_id(id).map_err(|e| pin_error(e.to_string()))?;
        map.pin(&path).map_err(|e| pin_error(e.to_string()))?;
        repaired.maps.push(name);
    }
    for link in links.iter_mut() {
        if link.path.exists() {
            continue;
        }
        let Some(fd) = link.fd.take() else { continue };
        let pinned = fd.pin(&link.path).map_err(|e| LoaderError::Link {
            path: link.path.clone(),
            message: e.to_string(),
        })?;
        link.fd = Some(FdLink::from(pinned));
        repaired.links.push(link.path.clone());
    }
    Ok(repaired)
}

/// Removes pinned links whose interface is gone (or was re-created with another index);
/// returns their file names.
#[must_use]
pub fn remove_stale_links(dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(pin::links_dir(dir)) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(SOCK_LINK_PREFIX) {
            continue;
        }
        let live = name
            .split_once('-')
            .and_then(|(_, rest)| rest.rsplit_once('-'))
            .is_some_and(|(iface, index)| ifindex(iface).is_some_and(|i| index == i.to_string()));
        if !live && fs::remove_file(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Unpins the link of a pod interface that was removed (the kernel detached it already).
pub fn unpin_pod_link(dir: &Path, iface: &str) {
    let _ = remove_links(dir, &format!("tc-{iface}-"));
}

const BPF_NOEXIST: u64 = 1;

/// What happened to the flows of a previous layout version's map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Migration {
    /// Entries copied into this version's map.
    Copied { from: String, entries: usize },
    /// The old map's entries have another size: not carried over.
    Incompatible { from: String },
}

/// This version's flow map (the flow table, conntrack, the SNAT table, or the legacy LRU SNAT
/// map) that the map pinned as `name` (another layout version's) corresponds to. The LRU
/// SNAT map of version 1 (`xlb_snat_v1`) becomes this version's legacy map.
fn flow_map_target(name: &str) -> Option<&'static str> {
    let base = name.rsplit_once("_v")?.0;
    [
        ("xlb_flows", map_names::FLOWS),
        ("xlb_ct", map_names::CONNTRACK),
        ("xlb_nat", map_names::NAT),
        ("xlb_snat", map_names::SNAT_LEGACY),
        ("xlb_snat_lru", map_names::SNAT_LEGACY),
    ]
    .into_iter()
    .find(|(b, _)| *b == base)
    .map(|(_, target)| target)
}

/// Takes the flow maps (conntrack, SNAT, flow table) of another layout version over as they are where
/// their entries have this build's layout: the pin is renamed to this version's name before
/// the load, so the new programs share the map with the old ones. Flows the old programs
/// create while the new ones start are then seen at once, where copying would leave a gap
/// between the last copy and the swap. Returns the (old, new) names taken over; the caller
/// must call this before [`load_pinned`].
#[must_use]
pub fn take_over_flow_maps(dir: &Path, old: &[String]) -> Vec<(String, &'static str)> {
    let mut taken = Vec::new();
    for name in old {
        let Some(target) = flow_map_target(name) else {
            continue;
        };
        let (from, to) = (pin::map_path(dir, name), pin::map_path(dir, target));
        if to.exists() {
            continue;
        }
        let Ok(info) = aya::maps::MapData::from_pin(&from).and_then(|m| m.info()) else {
            continue;
        };
        let bucket_size = match target {
            map_names::FLOWS => Some(size_of::<lb_common::FlowBucket>()),
            map_names::NAT => Some(size_of::<lb_common::NatBucket>()),
            _ => None,
        };
        let same_layout = if let Some(size) = bucket_size {
            matches!(info.map_type(), Ok(aya::maps::MapType::Array))
                && info.value_size() as usize == size
                && info.max_entries().is_power_of_two()
        } else {
            let value = if target == map_names::CONNTRACK {
                size_of::<lb_common::CtEntry>()
            } else {
                size_of::<lb_common::SnatEntry>()
            };
            matches!(info.map_type(), Ok(aya::maps::MapType::LruHash))
                && info.key_size() as usize == size_of::<lb_common::FlowKey>()
                && info.value_size() as usize == value
        };
        if same_layout && fs::rename(&from, &to).is_ok() {
            taken.push((name.clone(), target));
        }
    }
    taken
}

/// The backends (id, entry) of another layout version's backends map pinned under `dir`
/// (`old`: the file names found), where its entries have this build's layout; None otherwise.
#[must_use]
pub fn previous_backends(dir: &Path, old: &[String]) -> Option<Vec<(u32, lb_common::Backend)>> {
    let base = map_names::BACKENDS.rsplit_once("_v")?.0;
    let name = old
        .iter()
        .find(|n| n.rsplit_once("_v").is_some_and(|(b, _)| b == base))?;
    let data = aya::maps::MapData::from_pin(pin::map_path(dir, name)).ok()?;
    let info = data.info().ok()?;
    if info.value_size() as usize != size_of::<lb_common::Backend>() {
        return None;
    }
    let array: aya::maps::Array<_, lb_common::Backend> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    Some(
        array
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((u32::try_from(i).ok()?, b.ok()?)))
            .filter(|(_, b)| b.addr_be != 0 || b.generation != 0)
            .collect(),
    )
}

/// Carries conntrack and SNAT entries over from maps of another layout version pinned under
/// `dir` (`old`: their file names) into the freshly loaded maps of `ebpf`, where the entry
/// layout is the same and [`take_over_flow_maps`] could not share the map itself (this
/// version's map was already pinned, by an upgrade that stopped half-way). Called once
/// at load and again around the swap, for the flows the old programs created in between; an
/// entry already in this version's map is never overwritten.
pub fn migrate_flows(ebpf: &mut Ebpf, dir: &Path, old: &[String]) -> Vec<Migration> {
    let mut out = Vec::new();
    for name in old {
        let Some(target) = flow_map_target(name) else {
            continue;
        };
        // BPF_NOEXIST: keep what the new datapath already wrote.
        // Never over what this version's map holds: it may be shared with the running
        // programs (taken over), and `old` lists the newest version first.
        let flags = BPF_NOEXIST;
        let copied = if target == map_names::FLOWS || target == map_names::NAT {
            // A bucket table is shared (taken over) or not at all: its buckets are where the
            // hash of this build puts them, which another layout need not share.
            None
        } else if target == map_names::CONNTRACK {
            copy_entries::<lb_common::FlowKey, lb_common::CtEntry>(ebpf, dir, name, target, flags)
        } else {
            copy_entries::<lb_common::FlowKey, lb_common::SnatEntry>(ebpf, dir, name, target, flags)
        };
        out.push(match copied {
            Some(entries) => Migration::Copied {
                from: name.clone(),
                entries,
            },
            None => Migration::Incompatible { from: name.clone() },
        });
    }
    out
}

fn copy_entries<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    dir: &Path,
    old: &str,
    target: &str,
    flags: u64,
) -> Option<usize> {
    let data = aya::maps::MapData::from_pin(pin::map_path(dir, old)).ok()?;
    let info = data.info().ok()?;
    if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
        return None;
    }
    let from: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).ok()?;
    let mut to: aya::maps::HashMap<_, K, V> =
        aya::maps::HashMap::try_from(ebpf.map_mut(target)?).ok()?;
    let mut n = 0;
    for (k, v) in from.iter().filter_map(Result::ok) {
        if to.insert(k, v, flags).is_ok() {
            n += 1;
        }
    }
    Some(n)
}

/// The SNAT port range of another layout version's configuration pinned under `dir` (`old`:
/// the file names found): version 1's `Config` holds it at bytes 4..8 (minimum, maximum).
#[must_use]
pub fn previous_snat_range(dir: &Path, old: &[String]) -> Option<lb_common::PortRange> {
    let name = old.iter().find(|n| {
        n.rsplit_once("_v")
            .is_some_and(|(b, v)| b == "xlb_config" && v == "1")
    })?;
    let data = aya::maps::MapData::from_pin(pin::map_path(dir, name)).ok()?;
    if data.info().ok()?.value_size() != 64 {
        return None;
    }
    let array: aya::maps::Array<_, [u32; 16]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    let words = array.get(&0, 0).ok()?;
    let [min, max] = [words[1] as u16, (words[1] >> 16) as u16];
    let range = lb_common::PortRange::new(min, max);
    (!range.is_empty()).then_some(range)
}

/// Removes everything xlb pinned under `dir`: links first (which detaches the programs), then
/// maps, then the directory. Returns what was removed. A running agent holds its links and
/// maps open: it finds [`pin::cleanup_mark`], left first, lets them go (which detaches the
/// datapath) and turns unready, instead of pinning them again.
pub fn cleanup(dir: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    let pin_err = |source| LoaderError::PinDir {
        path: dir.to_owned(),
        source,
    };
    if dir.exists() {
        let mark = pin::cleanup_mark(dir);
        fs::create_dir_all(&mark).map_err(|source| LoaderError::PinDir { path: mark, source })?;
    }
    let mut removed = Vec::new();
    let links = pin::links_dir(dir);
    if let Ok(entries) = fs::read_dir(&links) {
        for e in entries.flatten() {
            fs::remove_file(e.path()).map_err(pin_err)?;
            removed.push(e.path());
        }
        fs::remove_dir(&links).map_err(pin_err)?;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            fs::remove_file(e.path()).map_err(pin_err)?;
            removed.push(e.path());
        }
        fs::remove_dir(dir).map_err(pin_err)?;
    }
    Ok(removed)
}

/// Attaches the pod program to `iface`'s ingress (what the pod sends) through tcx.
pub fn attach_pod(ebpf: &mut Ebpf, iface: &str) -> Result<(), LoaderError> {
    // Kernels >= 6.6 attach through tcx (no qdisc needed); README states that minimum.
    tc_program(ebpf)?
        .attach(iface, TcAttachType::Ingress)
        .map_err(|e| LoaderError::Program(PROG_POD, e))?;
    Ok(())
}

/// Loading a program, again when the kernel's verifier was interrupted: it gives up with
/// `EAGAIN` when a signal is pending for the loading thread (a child exiting, for instance), as
/// libbpf's loader also retries.
trait LoadRetrying {
    fn load_retrying(&mut self, name: &'static str) -> Result<(), LoaderError>;
}

macro_rules! load_retrying {
    ($($program:ty),*) => {$(
        impl LoadRetrying for $program {
            fn load_retrying(&mut self, name: &'static str) -> Result<(), LoaderError> {
                let mut tries = 0;
                loop {
                    match self.load() {
                        Err(aya::programs::ProgramError::LoadError { io_error, .. })
                            if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
                        {
                            tries += 1;
                        }
                        other => return other.map_err(|e| LoaderError::Program(name, e)),
                    }
                }
            }
        }
    )*};
}
load_retrying!(Xdp, SchedClassifier, CgroupSockAddr, CgroupSock);
