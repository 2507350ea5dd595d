//! Shared memory the master creates once (a memfd) and every worker maps: what must mean
//! the same for the whole node (rate limit and quota counters, the health probe board)
//! lives in such mappings, accessed only through atomics.

use std::io;
use std::os::fd::RawFd;

pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain memory; its users access it through atomics only.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `len` bytes at `offset` (page-aligned) of the memfd `fd`, shared with other processes.
    pub fn shared(fd: RawFd, len: usize, offset: usize) -> io::Result<Mapping> {
        Self::map(fd, len, offset, libc::MAP_SHARED)
    }

    /// Zeroed memory private to this process's threads (a lone worker, tests).
    pub fn anonymous(len: usize) -> io::Result<Mapping> {
        Self::map(-1, len, 0, libc::MAP_SHARED | libc::MAP_ANONYMOUS)
    }

    fn map(fd: RawFd, len: usize, offset: usize, flags: i32) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping; the kernel checks fd, length and offset, and zero-fills
        // anonymous memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    pub fn ptr(&self) -> *const u8 {
        self.ptr as *const u8
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped by `map` with this length; nothing uses it after the drop.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
