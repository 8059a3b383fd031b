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
