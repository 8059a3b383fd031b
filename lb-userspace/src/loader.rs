//! Loading the embedded datapath object and attaching its programs to interfaces.
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, Xdp, xdp::XdpMode},
};
use lb_common::{capacity, map_names};

/// The datapath object, built by build.rs from lb-ebpf.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-datapath"));

/// Program names in the object.
pub const PROG_NIC: &str = "xlb_nic";
pub const PROG_POD: &str = "xlb_pod";
/// The benchmark floor (an XDP program that only returns `XDP_PASS`). [`load`] leaves it out:
/// only the benchmark loads it, through [`floor_program`].
pub const PROG_FLOOR: &str = "xlb_noop";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("this xlb was built without its datapath (AYA_BUILD_SKIP); rebuild without it")]
    NoDatapath,
    #[error("loading the datapath into the kernel failed")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} is missing from the datapath object")]
    MissingProgram(&'static str),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] aya::programs::ProgramError),
}

/// Map capacities, chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub frontends: u32,
    pub backends: u32,
    pub ring_slots: u32,
    pub conntrack: u32,
    pub snat: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            frontends: capacity::FRONTENDS,
            backends: capacity::BACKENDS,
            ring_slots: capacity::RING_SLOTS,
            conntrack: capacity::CONNTRACK,
            snat: capacity::SNAT,
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
            snat: 4096,
        }
    }
}

/// Loads the embedded datapath with the given capacities (programs loaded, not attached).
pub fn load(caps: &Capacities) -> Result<Ebpf, LoaderError> {
    if DATAPATH.is_empty() {
        return Err(LoaderError::NoDatapath);
    }
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::FRONTENDS, caps.frontends)
        .map_max_entries(map_names::BACKENDS, caps.backends)
        .map_max_entries(
            map_names::RINGS,
            caps.ring_slots.div_ceil(lb_common::RING_LANES),
        )
        .map_max_entries(map_names::CONNTRACK, caps.conntrack)
        .map_max_entries(map_names::SNAT, caps.snat);
    let mut ebpf = loader.load(DATAPATH).map_err(LoaderError::Load)?;
    xdp_program(&mut ebpf)?
        .load()
        .map_err(|e| LoaderError::Program(PROG_NIC, e))?;
    tc_program(&mut ebpf)?
        .load()
        .map_err(|e| LoaderError::Program(PROG_POD, e))?;
    Ok(ebpf)
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

/// Attaches the pod program to `iface`'s ingress (what the pod sends) through tcx.
pub fn attach_pod(ebpf: &mut Ebpf, iface: &str) -> Result<(), LoaderError> {
    // Kernels >= 6.6 attach through tcx (no qdisc needed); README states that minimum.
    tc_program(ebpf)?
        .attach(iface, TcAttachType::Ingress)
        .map_err(|e| LoaderError::Program(PROG_POD, e))?;
    Ok(())
}
