//! Shared memory mappings of `BPF_F_MMAPABLE` array maps (the ring slab, the flow table):
//! the whole pages around a byte range of the map's values, unmapped when dropped.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

/// Pages of a map's values, mapped shared.
pub struct Pages {
    base: NonNull<libc::c_void>,
    len: usize,
    /// The map byte offset of `base` (page-aligned).
    first_byte: usize,
}

// SAFETY: the mapping is owned by this value (unmapped once, in Drop); what is read or written
// through it is up to the owner, which the datapath shares it with anyway.
unsafe impl Send for Pages {}

impl Pages {
    /// Maps the pages holding bytes `start..start + len` (`len` > 0) of the map's values,
    /// writable if `write`. The kernel refuses a range beyond the map, and a read-only
    /// descriptor (it cannot be mapped shared).
    pub fn map(map: &MapData, start: usize, len: usize, write: bool) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or(4096);
        let first_byte = start / page * page;
        let mapped = (start + len - first_byte).div_ceil(page) * page;
        let offset = libc::off_t::try_from(first_byte)
            .map_err(|_| io::Error::other("map offset beyond off_t"))?;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a shared mapping of pages of a BPF_F_MMAPABLE array's fd, inside the array
        // (the kernel refuses anything beyond it); Drop unmaps exactly this mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                prot,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: NonNull::new(ptr).ok_or_else(|| io::Error::other("mmap returned null"))?,
            len: mapped,
            first_byte,
        })
    }

    /// Whether map bytes `start..start + len` lie in the mapping.
    #[must_use]
    pub fn covers(&self, start: usize, len: usize) -> bool {
        start >= self.first_byte && start + len <= self.first_byte + self.len
    }

    /// The address of map byte `at`, as a `T` pointer; the caller makes sure the mapping
    /// covers what it reads or writes there, and that `at` is aligned for `T`.
    #[must_use]
    pub fn at<T>(&self, at: usize) -> *mut T {
        // Wrapping: computing the address is safe; dereferencing it is the caller's part.
        self.base
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(at - self.first_byte)
            .cast::<T>()
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what map() mapped.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

/// An array map of fixed-size buckets (`BPF_F_MMAPABLE`: the flow table, the SNAT table)
/// that the agent reads and changes in place, a window of buckets at a time.
pub struct BucketArray<B> {
    map: aya::maps::Map,
    buckets: u32,
    _bucket: std::marker::PhantomData<B>,
}

/// Buckets mapped at a time while walking a table (8 MiB of 128-byte buckets).
const WINDOW_BUCKETS: u32 = 1 << 16;

impl<B: aya::Pod> BucketArray<B> {
    /// The table behind `map`, if its values are `B`s (else the value size it has).
    pub fn new(map: MapData) -> Result<Self, BucketError> {
        let info = map
            .info()
            .map_err(|e| BucketError::Map(io::Error::other(e)))?;
        if info.value_size() as usize != size_of::<B>() {
            return Err(BucketError::Layout(info.value_size()));
        }
        Ok(Self {
            buckets: info.max_entries(),
            map: aya::maps::Map::Array(map),
            _bucket: std::marker::PhantomData,
        })
    }

    /// A second handle on map `name` of a loaded datapath.
    pub fn open(ebpf: &aya::Ebpf, name: &str) -> Result<Self, BucketError> {
        let err = |m: String| BucketError::Map(io::Error::other(m));
        let Some(aya::maps::Map::Array(data)) = ebpf.map(name) else {
            return Err(err(format!("the datapath has no array map {name}")));
        };
        let id = data.info().map_err(|e| err(e.to_string()))?.id();
        Self::new(MapData::from_id(id).map_err(|e| err(e.to_string()))?)
    }

    fn data(&self) -> &MapData {
        match &self.map {
            aya::maps::Map::Array(d) => d,
            // SAFETY-free invariant: `new` only builds `Map::Array`.
            _ => unreachable!("a bucket table is built as an array"),
        }
    }

    /// Buckets in the table.
    #[must_use]
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Bucket `index` read with a syscall: for descriptors that cannot be mapped (a read-only
    /// one, as `xlb` inspection commands open pinned maps: maps shared but not writable,
    /// which the kernel refuses for BPF maps).
    pub fn read(&self, index: u32) -> Result<B, BucketError> {
        let array: aya::maps::Array<&MapData, B> = aya::maps::Array::try_from(&self.map)
            .map_err(|e| BucketError::Map(io::Error::other(e)))?;
        array
            .get(&index, 0)
            .map_err(|e| BucketError::Map(io::Error::other(e)))
    }

    /// Calls `visit` with every bucket, in index order, until it returns false.
    pub fn visit(&self, mut visit: impl FnMut(u32, &B) -> bool) -> Result<(), BucketError> {
        let mut first = 0;
        while first < self.buckets {
            let count = WINDOW_BUCKETS.min(self.buckets - first);
            match self.window(first, count, false) {
                Ok(window) => {
                    for i in 0..count {
                        // SAFETY: the window maps buckets first..first + count; a volatile
                        // copy, as the datapath writes them concurrently (a torn copy only
                        // miscounts).
                        let b = unsafe { window.bucket(i).read_volatile() };
                        if !visit(first + i, &b) {
                            return Ok(());
                        }
                    }
                }
                Err(BucketError::Mmap(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                    for i in first..first + count {
                        if !visit(i, &self.read(i)?) {
                            return Ok(());
                        }
                    }
                }
                Err(e) => return Err(e),
            }
            first += count;
        }
        Ok(())
    }

    /// Calls `each` with a pointer to every bucket, mapped writable, a window at a time.
    pub fn for_each_mut(&self, mut each: impl FnMut(u32, *mut B)) -> Result<(), BucketError> {
        let mut first = 0;
        while first < self.buckets {
            let count = WINDOW_BUCKETS.min(self.buckets - first);
            let window = self.window(first, count, true)?;
            for i in 0..count {
                each(first + i, window.bucket(i));
            }
            first += count;
        }
        Ok(())
    }

    /// Maps the pages holding buckets `first..first + count` (inside the table).
    pub fn window(&self, first: u32, count: u32, write: bool) -> Result<Window<B>, BucketError> {
        let size = size_of::<B>();
        let pages = Pages::map(
            self.data(),
            first as usize * size,
            count as usize * size,
            write,
        )
        .map_err(BucketError::Mmap)?;
        Ok(Window {
            pages,
            first,
            _bucket: std::marker::PhantomData,
        })
    }

    /// The window size in buckets.
    #[must_use]
    pub const fn window_buckets() -> u32 {
        WINDOW_BUCKETS
    }
}

/// Buckets of a table mapped until dropped.
pub struct Window<B> {
    pages: Pages,
    first: u32,
    _bucket: std::marker::PhantomData<B>,
}

impl<B> Window<B> {
    /// Bucket `first + i` (the caller keeps `i` below the count mapped).
    #[must_use]
    pub fn bucket(&self, i: u32) -> *mut B {
        self.pages.at((self.first + i) as usize * size_of::<B>())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("the table's map: {0}")]
    Map(#[source] io::Error),
    #[error("the table has {0}-byte entries, not this build's bucket size")]
    Layout(u32),
    #[error("mapping the table: {0}")]
    Mmap(#[source] io::Error),
}
