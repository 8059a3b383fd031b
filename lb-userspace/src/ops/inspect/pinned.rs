//! A datapath's maps as pinned under a pin directory (`<dir>/<map name>`, see [`crate::datapath::pin`]),
//! opened read-only: the kernel refuses any write through these descriptors, so inspecting a
//! live datapath cannot disturb it. The maps outlive the agent, so this works with or without
//! one running.
use std::{
    ffi::CString,
    io,
    net::Ipv4Addr,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use lb_common::{
    AffinityEntry, AffinityKey, Backend, Config, Counter, CtEntry, FlowKey, Frontend, FrontendKey,
    RING_LANES, RingChunk, Verdict, map_names,
};

use super::{InspectError, MapSource};
use crate::datapath::{
    flows::{self, FlowTable},
    nattable::{self, NatTable},
    pin,
};

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Flows(#[from] flows::FlowsError),
    #[error(
        "no pinned datapath: {} does not exist (is the xlb agent running? it pins its maps \
         there; --pin-dir names another directory)",
        .0.display()
    )]
    NoPinDir(PathBuf),
    #[error(
        "map {name} is not pinned at {} (is an xlb agent of this version running? it pins \
         every map there)",
        path.display()
    )]
    NoMap { name: &'static str, path: PathBuf },
    #[error("permission denied reading {}: reading pinned maps needs root (CAP_BPF)", .0.display())]
    Permission(PathBuf),
    #[error("opening {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not the map this xlb expects (pinned by another xlb version?)", path.display())]
    Layout {
        path: PathBuf,
        #[source]
        source: MapError,
    },
}

/// Read-only handles on every map the inspection views read.
pub struct PinnedMaps {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, RingChunk>,
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    /// The flow table; absent in datapaths pinned before it existed.
    flows: Option<FlowTable>,
    stats: PerCpuArray<MapData, Counter>,
    config: Array<MapData, Config>,
    /// Session affinity; absent in datapaths pinned before it existed.
    affinity: Option<HashMap<MapData, AffinityKey, AffinityEntry>>,
    /// The SNAT table, its per-backend cursors and the excluded ports.
    nat: Option<NatTable>,
    nat_cursors: Option<Array<MapData, u32>>,
    nat_excluded: Option<Array<MapData, u64>>,
}

/// `BPF_OBJ_GET` with `BPF_F_RDONLY`: a read-only descriptor of the object pinned at `path`.
/// (aya's `MapData::from_pin` asks for a read-write one.)
fn obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_int = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    // The BPF_OBJ_* member of `union bpf_attr`; the kernel requires the rest to be zero.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute whose path outlives the call; the kernel
    // only reads `size_of::<ObjGetAttr>()` bytes of it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(ret).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_map(dir: &Path, name: &'static str) -> Result<Map, OpenError> {
    let path = pin::map_path(dir, name);
    let fd = obj_get_read_only(&path).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => OpenError::NoMap {
            name,
            path: path.clone(),
        },
        Some(libc::EACCES | libc::EPERM) => OpenError::Permission(path.clone()),
        _ => OpenError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let layout = |source| OpenError::Layout {
        path: path.clone(),
        source,
    };
    Map::from_map_data(MapData::from_fd(fd).map_err(layout)?).map_err(layout)
}

/// Opens map `name` under `dir` as the typed map `T`.
fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, OpenError> {
    T::try_from(open_map(dir, name)?).map_err(|source| OpenError::Layout {
        path: pin::map_path(dir, name),
        source,
    })
}

impl PinnedMaps {
    /// Opens the maps pinned under `dir`, read-only.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(OpenError::NoPinDir(dir.into())),
            Err(e) => {
                return Err(match e.kind() {
                    io::ErrorKind::NotFound => OpenError::NoPinDir(dir.into()),
                    io::ErrorKind::PermissionDenied => OpenError::Permission(dir.into()),
                    _ => OpenError::Io {
                        path: dir.into(),
                        source: e,
                    },
                });
            }
        }
        Ok(Self {
            frontends: open(dir, map_names::FRONTENDS)?,
            backends: open(dir, map_names::BACKENDS)?,
            rings: open(dir, map_names::RINGS)?,
            conntrack: open(dir, map_names::CONNTRACK)?,
            flows: match open_map(dir, map_names::FLOWS) {
                Ok(Map::Array(data)) => Some(FlowTable::new(data)?),
                Ok(_) | Err(OpenError::NoMap { .. }) => None,
                Err(e) => return Err(e),
            },
            stats: open(dir, map_names::STATS)?,
            config: open(dir, map_names::CONFIG)?,
            affinity: open(dir, map_names::AFFINITY).ok(),
            nat: match open_map(dir, map_names::NAT) {
                Ok(Map::Array(data)) => Some(NatTable::new(data)?),
                Ok(_) | Err(OpenError::NoMap { .. }) => None,
                Err(e) => return Err(e),
            },
            nat_cursors: open(dir, map_names::NAT_CURSORS).ok(),
            nat_excluded: open(dir, map_names::NAT_EXCLUDED).ok(),
        })
    }
}

fn read(map: &'static str) -> impl Fn(MapError) -> InspectError {
    move |source| InspectError::Read { map, source }
}

/// A hash map lookup: a missing key is `None`.
fn lookup<V>(r: Result<V, MapError>, map: &'static str) -> Result<Option<V>, InspectError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(read(map)(e)),
    }
}

impl MapSource for PinnedMaps {
    fn affinity(&self, key: &AffinityKey) -> Result<Option<AffinityEntry>, InspectError> {
        match &self.affinity {
            Some(m) => lookup(m.get(key, 0), map_names::AFFINITY),
            None => Ok(None),
        }
    }

    fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, InspectError> {
        self.frontends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(read(map_names::FRONTENDS))
    }

    fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, InspectError> {
        lookup(self.frontends.get(key, 0), map_names::FRONTENDS)
    }

    fn backend(&self, id: u32) -> Result<Option<Backend>, InspectError> {
        if id >= self.backends.len() {
            return Ok(None);
        }
        self.backends
            .get(&id, 0)
            .map(Some)
            .map_err(read(map_names::BACKENDS))
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, InspectError> {
        let mut out = Vec::new();
        for (id, b) in (0..).zip(self.backends.iter()) {
            let b = b.map_err(read(map_names::BACKENDS))?;
            if b.addr_be != 0 {
                out.push((id, b));
            }
        }
        Ok(out)
    }

    fn ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, InspectError> {
        let lanes = u64::from(RING_LANES);
        let chunks = u64::from(self.rings.len());
        let end = u64::from(offset) + u64::from(len);
        let mut out = Vec::with_capacity(len as usize);
        let mut slot = u64::from(offset);
        // Only the chunks the region covers, each read once.
        while slot < end {
            let chunk = slot / lanes;
            let first = (slot % lanes) as usize;
            let last = (end - chunk * lanes).min(lanes) as usize;
            if chunk < chunks {
                let c = self
                    .rings
                    .get(&(chunk as u32), 0)
                    .map_err(read(map_names::RINGS))?;
                out.extend_from_slice(&c[first..last]);
            } else {
                out.resize(out.len() + (last - first), 0);
            }
            slot = chunk * lanes + last as u64;
        }
        Ok(out)
    }

    /// As the datapath looks it up: the flow table, then the LRU map.
    fn conntrack_entry(&self, key: &FlowKey) -> Result<Option<CtEntry>, InspectError> {
        if let Some(table) = &self.flows
            && let Some(e) = table.entry(key)?
        {
            return Ok(Some(e));
        }
        lookup(self.conntrack.get(key, 0), map_names::CONNTRACK)
    }

    fn conntrack(
        &self,
        visit: &mut dyn FnMut(&FlowKey, &CtEntry) -> bool,
    ) -> Result<(), InspectError> {
        if let Some(table) = &self.flows {
            let mut go_on = true;
            table.visit(|_, b| {
                for s in b.slots.iter().filter(|s| s.client_addr_be != 0) {
                    for (k, v) in flows::entries(s) {
                        go_on = go_on && visit(&k, &v);
                    }
                }
                go_on
            })?;
            if !go_on {
                return Ok(());
            }
        }
        // Entries evicted meanwhile are skipped by the iterator.
        for item in &self.conntrack {
            let (k, v) = item.map_err(read(map_names::CONNTRACK))?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    fn stats(&self) -> Result<Vec<(Verdict, Counter)>, InspectError> {
        let mut out = Vec::with_capacity(Verdict::ALL.len());
        for v in Verdict::ALL {
            let per_cpu = match self.stats.get(&(v as u32), 0) {
                Ok(c) => c,
                // A datapath with fewer verdicts than this xlb knows.
                Err(MapError::OutOfBounds { .. }) => continue,
                Err(e) => return Err(read(map_names::STATS)(e)),
            };
            let sum = per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets.wrapping_add(c.packets),
                bytes: a.bytes.wrapping_add(c.bytes),
            });
            out.push((v, sum));
        }
        Ok(out)
    }

    fn snat_cursor(&self, id: u32) -> Result<Option<u32>, InspectError> {
        match &self.nat_cursors {
            Some(m) if id < m.len() => m
                .get(&id, 0)
                .map(Some)
                .map_err(read(map_names::NAT_CURSORS)),
            _ => Ok(None),
        }
    }

    fn snat_in_use(&self, backend: (Ipv4Addr, u16, u8)) -> Result<Option<u32>, InspectError> {
        let (Some(table), Some(config)) = (&self.nat, self.config()?) else {
            return Ok(None);
        };
        let fill = table.fill(nattable::now_s(), &config.timeouts)?;
        Ok(Some(fill.by_backend.get(&backend).copied().unwrap_or(0)))
    }

    fn snat_excluded(&self) -> Result<Option<Vec<u64>>, InspectError> {
        let Some(m) = &self.nat_excluded else {
            return Ok(None);
        };
        m.iter()
            .collect::<Result<Vec<u64>, _>>()
            .map(Some)
            .map_err(read(map_names::NAT_EXCLUDED))
    }

    fn config(&self) -> Result<Option<Config>, InspectError> {
        self.config
            .get(&0, 0)
            .map(Some)
            .map_err(read(map_names::CONFIG))
    }
}
