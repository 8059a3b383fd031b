//! Writing the datapath's maps. The programmer turns desired state into a list of [`Op`]s;
//! an [`LbMaps`] applies them one at a time: [`AyaMaps`] to the kernel's maps, [`FakeMaps`]
//! to memory (tests and benchmarks), where [`FakeMaps::resolve`] plays the datapath's lookup.
use std::{collections::BTreeMap, io};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError},
};
use lb_common::{Backend, Config, Frontend, FrontendKey, hash::flow_hash, map_names};

use crate::datapath::mapmem::Pages;

/// One write to the datapath's maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create or update backend `id`.
    SetBackend {
        id: u32,
        value: Backend,
    },
    /// Write a ring region starting at `offset`.
    WriteRing {
        offset: u32,
        slots: Vec<u32>,
    },
    /// Create or flip a frontend (to a new ring region, flags, ...).
    SetFrontend {
        key: FrontendKey,
        value: Frontend,
    },
    RemoveFrontend {
        key: FrontendKey,
    },
    /// Clear backend `id` (no frontend uses it any more).
    ClearBackend {
        id: u32,
    },
    SetConfig(Config),
}

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {0} is missing from the datapath object")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("mapping the ring slab: {0}")]
    Mmap(#[source] io::Error),
    #[error("ring region {offset}+{len} is beyond the slab ({capacity} slots)")]
    RingBounds {
        offset: u32,
        len: usize,
        capacity: u32,
    },
}

/// Something that applies [`Op`]s.
pub trait LbMaps {
    fn apply(&mut self, op: &Op) -> Result<(), MapsError>;
}

/// The ring slab (a `BPF_F_MMAPABLE` array): a region is written with plain stores through a
/// mapping of just the pages around it. The kernel puts every page of such a mapping in place
/// at `mmap`, so a mapping of the whole slab would count all of it (64 MiB by default) in the
/// agent's RSS for as long as it lived; the slab's memory belongs to the map, which the
/// datapath keeps whether or not the agent maps it. One aligned chunk ([`CHUNK_SLOTS`]) stays
/// mapped between writes, so a sync writing thousands of rings (allocated mostly in order)
/// maps a few chunks rather than every ring; a region across a chunk boundary gets a mapping
/// of its own.
struct RingSlab {
    map: MapData,
    slots: u32,
    /// The chunk mapped last, kept for the next write.
    chunk: Option<Window>,
}

/// Slots per cached chunk: 1 MiB, the most of the slab the agent keeps mapped.
const CHUNK_SLOTS: usize = 1 << 18;

impl RingSlab {
    fn new(map: MapData, slots: u32) -> Self {
        Self {
            map,
            slots,
            chunk: None,
        }
    }

    fn write(&mut self, offset: u32, slots: &[u32]) -> Result<(), MapsError> {
        if u64::from(offset) + slots.len() as u64 > u64::from(self.slots) {
            return Err(MapsError::RingBounds {
                offset,
                len: slots.len(),
                capacity: self.slots,
            });
        }
        if slots.is_empty() {
            return Ok(());
        }
        let (start, count) = (offset as usize, slots.len());
        let chunk = start / CHUNK_SLOTS;
        let own;
        let window = if (start + count - 1) / CHUNK_SLOTS == chunk {
            let cached = self.chunk.as_ref().is_some_and(|w| w.covers(start, count));
            if !cached {
                // Unmap the old chunk before mapping the next one.
                self.chunk = None;
                let first = chunk * CHUNK_SLOTS;
                let last = (first + CHUNK_SLOTS).min(self.slots as usize);
                self.chunk = Some(Window::map(&self.map, first, last - first, true)?);
            }
            self.chunk
                .as_ref()
                .ok_or(MapsError::Mmap(io::Error::other("no chunk")))?
        } else {
            own = Window::map(&self.map, start, count, true)?;
            &own
        };
        let dst = window.slot(start);
        // SAFETY: the window maps slots start..start + count (it covers them: bounds checked
        // above, and by `covers` or by mapping exactly them); the region is ours (the
        // programmer allocates regions and never hands one to two frontends with different
        // contents). Volatile stores: the datapath reads this memory concurrently.
        unsafe {
            for (i, s) in slots.iter().enumerate() {
                dst.add(i).write_volatile(*s);
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn read(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapsError> {
        let end = (u64::from(offset) + u64::from(len)).min(u64::from(self.slots));
        let Some(len) = end.checked_sub(u64::from(offset)).filter(|n| *n > 0) else {
            return Ok(Vec::new());
        };
        let (start, len) = (offset as usize, len as usize);
        let window = Window::map(&self.map, start, len, false)?;
        let src = window.slot(start);
        // SAFETY: the window maps exactly slots start..start + len, which lie in the slab.
        Ok((0..len)
            .map(|i| unsafe { src.add(i).read_volatile() })
            .collect())
    }
}

/// The pages of the slab that hold some of its slots, mapped until dropped.
struct Window(Pages);

impl Window {
    /// Maps the pages holding slots `start..start + count` (`count` > 0, inside the slab).
    fn map(map: &MapData, start: usize, count: usize, write: bool) -> Result<Self, MapsError> {
        Pages::map(map, start * 4, count * 4, write)
            .map(Self)
            .map_err(MapsError::Mmap)
    }

    /// Whether slots `start..start + count` lie in this window.
    fn covers(&self, start: usize, count: usize) -> bool {
        self.0.covers(start * 4, count * 4)
    }

    /// The address of slot `start`, which the caller made sure the window covers.
    fn slot(&self, start: usize) -> *mut u32 {
        self.0.at(start * 4)
    }
}

/// The kernel's maps of a loaded datapath.
pub struct AyaMaps {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    frontend_capacity: u32,
    backends: Array<MapData, Backend>,
    rings: RingSlab,
    config: Array<MapData, Config>,
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, MapsError> {
    ebpf.take_map(name).ok_or(MapsError::Missing(name))
}

impl AyaMaps {
    /// Takes the writable maps out of a loaded datapath (the programs keep using them).
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let err = |name| move |source| MapsError::Map { name, source };
        let Map::HashMap(frontend_data) = take(ebpf, map_names::FRONTENDS)? else {
            return Err(MapsError::Missing(map_names::FRONTENDS));
        };
        let frontend_capacity = frontend_data
            .info()
            .map_err(err(map_names::FRONTENDS))?
            .max_entries();
        let frontends =
            HashMap::try_from(Map::HashMap(frontend_data)).map_err(err(map_names::FRONTENDS))?;
        let backends =
            Array::try_from(take(ebpf, map_names::BACKENDS)?).map_err(err(map_names::BACKENDS))?;
        let config =
            Array::try_from(take(ebpf, map_names::CONFIG)?).map_err(err(map_names::CONFIG))?;
        let Map::Array(ring_data) = take(ebpf, map_names::RINGS)? else {
            return Err(MapsError::Missing(map_names::RINGS));
        };
        // RING_LANES slots per element, elements contiguous: the mapping is a flat [u32].
        let elements = ring_data
            .info()
            .map_err(err(map_names::RINGS))?
            .max_entries();
        let slots = elements * lb_common::RING_LANES;
        let rings = RingSlab::new(ring_data, slots);
        Ok(Self {
            frontends,
            frontend_capacity,
            backends,
            rings,
            config,
        })
    }

    /// All backends with an address, by id (adoption at start).
    #[must_use]
    pub fn backends(&self) -> Vec<(u32, Backend)> {
        self.backends
            .iter()
            .enumerate()
            .filter_map(|(i, b)| Some((u32::try_from(i).ok()?, b.ok()?)))
            .filter(|(_, b)| b.addr_be != 0)
            .collect()
    }

    /// The capacities of the maps as they are (pinned maps keep the sizes they were made with).
    #[must_use]
    pub fn capacities(
        &self,
        requested: &crate::datapath::loader::Capacities,
    ) -> crate::datapath::loader::Capacities {
        crate::datapath::loader::Capacities {
            frontends: self.frontend_capacity,
            backends: self.backends.len(),
            ring_slots: self.rings.slots,
            ..*requested
        }
    }

    /// The node configuration the datapath reads (zeroed before the first `SetConfig`).
    pub fn config(&self) -> Result<Config, MapsError> {
        self.config.get(&0, 0).map_err(|source| MapsError::Map {
            name: map_names::CONFIG,
            source,
        })
    }

    /// All frontend entries (inspection, tests).
    #[must_use]
    pub fn frontends(&self) -> Vec<(FrontendKey, Frontend)> {
        self.frontends.iter().filter_map(Result::ok).collect()
    }

    /// Reads a ring region back (adoption at start).
    pub fn ring(&self, offset: u32, len: u32) -> Result<Vec<u32>, MapsError> {
        self.rings.read(offset, len)
    }
}

impl LbMaps for AyaMaps {
    fn apply(&mut self, op: &Op) -> Result<(), MapsError> {
        let res = match op {
            Op::SetBackend { id, value } => self
                .backends
                .set(*id, value, 0)
                .map_err(|e| (map_names::BACKENDS, e)),
            Op::ClearBackend { id } => self
                .backends
                .set(*id, Backend::default(), 0)
                .map_err(|e| (map_names::BACKENDS, e)),
            Op::WriteRing { offset, slots } => return self.rings.write(*offset, slots),
            Op::SetFrontend { key, value } => self
                .frontends
                .insert(key, value, 0)
                .map_err(|e| (map_names::FRONTENDS, e)),
            Op::RemoveFrontend { key } => match self.frontends.remove(key) {
                // Already gone is what we wanted.
                Err(MapError::KeyNotFound) => Ok(()),
                r => r.map_err(|e| (map_names::FRONTENDS, e)),
            },
            Op::SetConfig(c) => self.config.set(0, c, 0).map_err(|e| (map_names::CONFIG, e)),
        };
        res.map_err(|(name, source)| MapsError::Map { name, source })
    }
}

/// In-memory maps for tests and benchmarks, with the datapath's lookup.
#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub backends: BTreeMap<u32, Backend>,
    pub rings: BTreeMap<u32, u32>,
    pub config: Config,
    pub ops_applied: u64,
}

impl LbMaps for FakeMaps {
    fn apply(&mut self, op: &Op) -> Result<(), MapsError> {
        self.ops_applied += 1;
        match op {
            Op::SetBackend { id, value } => {
                self.backends.insert(*id, *value);
            }
            Op::ClearBackend { id } => {
                self.backends.remove(id);
            }
            Op::WriteRing { offset, slots } => {
                for (i, s) in slots.iter().enumerate() {
                    self.rings.insert(offset + i as u32, *s);
                }
            }
            Op::SetFrontend { key, value } => {
                self.frontends.insert(*key, *value);
            }
            Op::RemoveFrontend { key } => {
                self.frontends.remove(key);
            }
            Op::SetConfig(c) => self.config = *c,
        }
        Ok(())
    }
}

impl FakeMaps {
    /// What the datapath would pick for a new flow from `src` to frontend `key`: the backend,
    /// or `None` for a drop. Mirrors `select::forward` in lb-ebpf.
    #[must_use]
    pub fn resolve(&self, key: &FrontendKey, src_be: u32, sport_be: u16) -> Option<Backend> {
        let fe = self.frontends.get(key)?;
        if fe.ring_size == 0 {
            return None;
        }
        let h = flow_hash(src_be, key.addr_be, sport_be, key.port_be, key.proto);
        let id = *self.rings.get(&(fe.ring_offset + h % fe.ring_size))?;
        let b = self.backends.get(&id)?;
        (b.addr_be != 0).then_some(*b)
    }
}
