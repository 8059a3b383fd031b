//! Capturing frames on a lab interface with an `AF_PACKET` socket, to check bytes as they
//! cross a wire. veth marks received packets as checksum-verified, so a receiving kernel never
//! notices a wrong checksum; only a capture with a full recomputation does. Call from a thread
//! inside the namespace ([`lb_lab::Netns::enter`]); turn GRO off on the interface first, or
//! merged packets show up instead of what was on the wire.
use std::{io, mem, os::fd::AsRawFd as _, os::fd::FromRawFd as _, os::fd::OwnedFd, time::Duration};

/// A raw socket receiving every frame of one interface.
pub struct Capture {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    pub fn open(iface: &str) -> io::Result<Self> {
        let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
        // SAFETY: plain socket calls; the fd is owned at once.
        unsafe {
            let index = libc::if_nametoindex(name.as_ptr());
            if index == 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
            if libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as u32,
            );
            Ok(Self { fd })
        }
    }

    /// Frames received until `deadline` passes or `stop` says so, those `keep` accepts.
    pub fn collect(
        &self,
        within: Duration,
        mut keep: impl FnMut(&[u8]) -> bool,
        mut stop: impl FnMut(&[Vec<u8>]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = std::time::Instant::now() + within;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while std::time::Instant::now() < deadline && !stop(&frames) {
            // SAFETY: reading into a buffer we own, bounded by its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if let Ok(n) = usize::try_from(n)
                && keep(&buf[..n])
            {
                frames.push(buf[..n].to_vec());
            }
        }
        frames
    }
}
