//! Load for the forwarding benchmark: a UDP packet generator that writes whole Ethernet frames
//! on the client's interface through an `AF_PACKET` socket with `sendmmsg` (so any source
//! address and port can be used without configuring them, and the client's own stack costs
//! nothing per packet), and sinks that count what pods receive with `recvmmsg`.
//!
//! Every run is bounded in packets and in time. Frames carry full IPv4 and UDP checksums, as
//! from a NIC without offload.
use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// Frame length: Ethernet 14 + IPv4 20 + UDP 8 + payload 18 = 60 (the minimum frame).
pub const FRAME_LEN: usize = 60;
const PAYLOAD_LEN: usize = FRAME_LEN - 14 - 20 - 8;
/// Frames per `sendmmsg`/`recvmmsg` call.
const BATCH: usize = 64;

/// Which 5-tuples a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// `flows` fixed 5-tuples, reused round-robin (they are in conntrack after the first).
    Established { flows: u32 },
    /// A new 5-tuple every packet: source address × source port over 2^17 × 60,000
    /// combinations, never repeated within a run.
    NewFlows,
}

/// The `k`-th packet's source: established flows come from 203.0.113.0/24 (a documentation
/// range), new flows from 198.18.0.0/15 (the benchmarking range of RFC 2544).
#[must_use]
pub fn source(mix: Mix, k: u64) -> SocketAddrV4 {
    const PORTS: u64 = 60_000;
    match mix {
        Mix::Established { flows } => {
            let f = k % u64::from(flows.max(1));
            SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 40_000 + f as u16)
        }
        Mix::NewFlows => {
            let addr = u32::from_be_bytes([198, 18, 0, 0]) + ((k / PORTS) % (1 << 17)) as u32;
            SocketAddrV4::new(Ipv4Addr::from(addr), 1024 + (k % PORTS) as u16)
        }
    }
}

/// Ones' complement sum of big-endian 16-bit words.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Writes a UDP frame `src → dst` with full checksums into `f`.
pub fn write_frame(
    f: &mut [u8; FRAME_LEN],
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddrV4,
    dst: SocketAddrV4,
) {
    let (src_mac, dst_mac) = macs;
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&((20 + 8 + PAYLOAD_LEN) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let csum = fold(sum16(ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp_len = (8 + PAYLOAD_LEN) as u16;
    let udp = &mut f[34..FRAME_LEN];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    udp[8..].fill(0);
    let mut acc = sum16(&src.ip().octets(), 0);
    acc = sum16(&dst.ip().octets(), acc);
    acc += 17 + u32::from(udp_len);
    let csum = match fold(sum16(udp, acc)) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&csum.to_be_bytes());
}

/// Where the generator sends from and to.
#[derive(Clone, Debug)]
pub struct Target {
    /// Interface index of the client's NIC (in the client's namespace).
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    /// The next hop's MAC (the node's NIC).
    pub dst_mac: [u8; 6],
    /// Destinations, used round-robin by packet number.
    pub dsts: Vec<SocketAddrV4>,
}

/// An `AF_PACKET` socket bound to one interface. Create it inside the client's namespace.
pub fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid socket.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex.cast_signed();
    // SAFETY: addr is a valid sockaddr_ll of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let one: i32 = 1;
    // Skip the qdisc layer: the generator is the NIC's only user. Best effort.
    // SAFETY: a valid int option.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<i32>() as u32,
        );
    }
    Ok(fd)
}

/// What one generator run did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Frames the kernel accepted (the veth may still drop them: that is load shedding).
    pub packets: u64,
    /// Frames `sendmmsg` refused (ENOBUFS and the like).
    pub refused: u64,
    pub seconds: f64,
}

/// Sends from `sockets` (one thread each) until `duration` passed or `max_packets` went out.
/// Thread `t` of `n` sends packets `first + t`, `first + t + n`, ...
pub fn send(
    sockets: Vec<OwnedFd>,
    target: &Target,
    mix: Mix,
    first: u64,
    duration: Duration,
    max_packets: u64,
) -> io::Result<Sent> {
    let n = sockets.len() as u64;
    let started = Instant::now();
    let deadline = started + duration;
    let per_thread = max_packets / n.max(1);
    let handles: Vec<JoinHandle<io::Result<(u64, u64)>>> = sockets
        .into_iter()
        .enumerate()
        .map(|(t, fd)| {
            let target = target.clone();
            thread::spawn(move || {
                send_loop(
                    &fd,
                    &target,
                    mix,
                    (first + t as u64, n),
                    deadline,
                    per_thread,
                )
            })
        })
        .collect();
    let mut sent = Sent::default();
    for h in handles {
        let (packets, refused) = h
            .join()
            .map_err(|_| io::Error::other("a generator thread panicked"))??;
        sent.packets += packets;
        sent.refused += refused;
    }
    sent.seconds = started.elapsed().as_secs_f64();
    Ok(sent)
}

fn send_loop(
    fd: &OwnedFd,
    target: &Target,
    mix: Mix,
    (start, stride): (u64, u64),
    deadline: Instant,
    max_packets: u64,
) -> io::Result<(u64, u64)> {
    let mut frames = vec![[0u8; FRAME_LEN]; BATCH];
    let mut k = start;
    let (mut sent, mut refused) = (0u64, 0u64);
    let macs = (target.src_mac, target.dst_mac);
    let dsts = target.dsts.len().max(1) as u64;
    while sent + refused < max_packets && Instant::now() < deadline {
        let count = BATCH.min((max_packets - sent - refused) as usize);
        for f in &mut frames[..count] {
            let dst = target.dsts[(k % dsts) as usize];
            write_frame(f, macs, source(mix, k), dst);
            k += stride;
        }
        // SAFETY: iovec/mmsghdr are plain data; every pointer refers to `frames`, which
        // outlives the call.
        let mut iov: Vec<libc::iovec> = frames[..count]
            .iter_mut()
            .map(|f| libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: FRAME_LEN,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: zeroed mmsghdr is valid; only the iovec is set.
                let mut m: libc::mmsghdr = unsafe { zeroed() };
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0usize;
        while done < count {
            // SAFETY: msgs[done..count] are initialised headers pointing into `frames`.
            let rc = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (count - done) as u32,
                    0,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS | libc::EAGAIN) => {
                        refused += 1;
                        done += 1;
                    }
                    _ => return Err(e),
                }
            } else {
                let n = usize::try_from(rc).unwrap_or(0);
                done += n;
                sent += n as u64;
            }
        }
    }
    Ok((sent, refused))
}

/// Sinks: one thread per socket counting datagrams with `recvmmsg`.
pub struct Sinks {
    counts: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Sinks {
    /// Starts counting on `sockets` (bound in the pods' namespaces).
    pub fn start(sockets: Vec<UdpSocket>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut counts = Vec::new();
        let mut threads = Vec::new();
        for s in sockets {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let buf: i32 = 8 << 20;
            // SAFETY: a valid int option; as root, FORCE lifts the rmem_max cap.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const buf).cast(),
                    size_of::<i32>() as u32,
                );
            }
            let count = Arc::new(AtomicU64::new(0));
            counts.push(Arc::clone(&count));
            let stop = Arc::clone(&stop);
            threads.push(thread::spawn(move || sink_loop(&s, &count, &stop)));
        }
        Ok(Self {
            counts,
            stop,
            threads,
        })
    }

    /// Datagrams received so far, per socket.
    #[must_use]
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub fn stop(self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join()
                .map_err(|_| io::Error::other("a sink thread panicked"))??;
        }
        Ok(())
    }
}

fn sink_loop(s: &UdpSocket, count: &AtomicU64, stop: &AtomicBool) -> io::Result<()> {
    let mut bufs = vec![[0u8; 64]; BATCH];
    let mut iov: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 64,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .iter_mut()
        .map(|v| {
            // SAFETY: zeroed mmsghdr is valid; only the iovec is set.
            let mut m: libc::mmsghdr = unsafe { zeroed() };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: msgs point into `bufs`, alive for the call; MSG_WAITFORONE blocks for the
        // first datagram at most SO_RCVTIMEO, then takes what is queued.
        let rc = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => {}
                _ => return Err(e),
            }
        } else {
            count.fetch_add(u64::try_from(rc).unwrap_or(0), Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::{FRAME_LEN, Mix, fold, source, sum16, write_frame};

    #[test]
    fn new_flows_never_repeat_within_a_long_run() {
        let a = source(Mix::NewFlows, 0);
        assert_eq!(a, "198.18.0.0:1024".parse().expect("addr"));
        assert_eq!(
            source(Mix::NewFlows, 60_000),
            "198.18.0.1:1024".parse().expect("addr")
        );
        let mut seen = std::collections::HashSet::new();
        for k in (0..5_000_000u64).step_by(997) {
            assert!(seen.insert(source(Mix::NewFlows, k)), "repeat at {k}");
        }
        let est = Mix::Established { flows: 64 };
        assert_eq!(source(est, 3), source(est, 67));
    }

    #[test]
    fn frames_carry_valid_checksums() {
        let mut f = [0u8; FRAME_LEN];
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, 4), 5555);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 11), 32510);
        write_frame(&mut f, ([2; 6], [4; 6]), src, dst);
        // A correct header sums to 0xffff (fold gives 0).
        assert_eq!(fold(sum16(&f[14..34], 0)), 0);
        let mut acc = sum16(&f[26..34], 0) + 17 + 26;
        acc = sum16(&f[34..], acc);
        assert_eq!(fold(acc), 0);
        assert_eq!(&f[0..6], &[4; 6]);
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 32510);
    }
}
