//! Talking to the lab's echo backends (`xlb-echo`): an HTTP/1.1 GET, a UDP exchange, a large
//! download checked byte for byte. Each call runs in the caller's network namespace (use
//! [`crate::Netns::enter`]) and is bounded by a timeout.
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

/// The bytes of the `/bytes/N` stream at `offset..offset + len`.
#[must_use]
pub fn pattern_chunk(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect()
}

/// What an echo backend said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The pod that answered.
    pub pod: String,
    /// The client address the pod saw.
    pub client: SocketAddr,
}

fn parse_answer(body: &str) -> io::Result<Answer> {
    let mut pod = None;
    let mut client = None;
    for field in body.split_whitespace() {
        if let Some(p) = field.strip_prefix("pod=") {
            pod = Some(p.to_owned());
        } else if let Some(c) = field.strip_prefix("client=") {
            client = c.parse().ok();
        }
    }
    match (pod, client) {
        (Some(pod), Some(client)) => Ok(Answer { pod, client }),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer {body:?}"),
        )),
    }
}

/// Connects to `addr` and sends `GET /`.
pub fn http_get(addr: SocketAddrV4, timeout: Duration) -> io::Result<Answer> {
    let s = TcpStream::connect_timeout(&addr.into(), timeout)?;
    get_on(s, addr, timeout)
}

/// Like [`http_get`], also returning the peer address the socket reports (`getpeername`).
pub fn http_get_peer(addr: SocketAddrV4, timeout: Duration) -> io::Result<(Answer, SocketAddr)> {
    let s = TcpStream::connect_timeout(&addr.into(), timeout)?;
    let peer = s.peer_addr()?;
    Ok((get_on(s, addr, timeout)?, peer))
}

/// Like [`http_get_peer`] from a dual-stack IPv6 socket to `addr`'s IPv4-mapped address
/// (`::ffff:a.b.c.d`), as Java and other dual-stack clients connect to IPv4 services.
pub fn http_get_peer_mapped(
    addr: SocketAddrV4,
    timeout: Duration,
) -> io::Result<(Answer, SocketAddr)> {
    let mapped = std::net::SocketAddrV6::new(addr.ip().to_ipv6_mapped(), addr.port(), 0, 0);
    let s = TcpStream::connect_timeout(&mapped.into(), timeout)?;
    let peer = s.peer_addr()?;
    Ok((get_on(s, addr, timeout)?, peer))
}

/// Like [`http_get`], from local port `port` (a fixed 5-tuple, so a test that checks how
/// flows spread is deterministic rather than at the mercy of ephemeral port choice).
pub fn http_get_from(addr: SocketAddrV4, port: u16, timeout: Duration) -> io::Result<Answer> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port).into())?;
    sock.connect_timeout(&SocketAddr::V4(addr).into(), timeout)?;
    get_on(sock.into(), addr, timeout)
}

fn get_on(mut s: TcpStream, addr: SocketAddrV4, timeout: Duration) -> io::Result<Answer> {
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut r = BufReader::new(s);
    let len = read_head(&mut r)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    parse_answer(&String::from_utf8_lossy(&body))
}

/// Reads a response head; returns Content-Length.
fn read_head(r: &mut BufReader<TcpStream>) -> io::Result<usize> {
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("status {status:?}"),
        ));
    }
    let mut len = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().ok();
        }
    }
    len.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no content-length"))
}

/// A long-lived HTTP/1.1 connection for repeated requests on one flow.
pub struct KeepAlive {
    r: BufReader<TcpStream>,
    addr: SocketAddrV4,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddrV4, timeout: Duration) -> io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr.into(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Self {
            r: BufReader::new(s),
            addr,
        })
    }

    /// One request on the same connection.
    pub fn get(&mut self) -> io::Result<Answer> {
        let req = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        self.r.get_mut().write_all(req.as_bytes())?;
        let len = read_head(&mut self.r)?;
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body)?;
        parse_answer(&String::from_utf8_lossy(&body))
    }
}

/// Downloads `/bytes/n` and checks every byte against the pattern; returns who served it.
pub fn download(addr: SocketAddrV4, n: u64, timeout: Duration) -> io::Result<String> {
    download_paced(addr, n, timeout, Duration::ZERO)
}

/// Like [`download`], pausing `pause` after each read: a stream that stays open for a while
/// (the server's sends wait on the client's window).
pub fn download_paced(
    addr: SocketAddrV4,
    n: u64,
    timeout: Duration,
    pause: Duration,
) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(
        format!("GET /bytes/{n} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut pod = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some(v) = h.strip_prefix("X-Pod:") {
            v.trim().clone_into(&mut pod);
        }
    }
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while got < n {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{got} of {n} bytes"),
            ));
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
        if buf[..k] != pattern_chunk(got, k)[..] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt bytes near {got}"),
            ));
        }
        got += k as u64;
    }
    Ok(pod)
}

/// Sends one datagram to `addr` and waits for the echo.
pub fn udp_ask(addr: SocketAddrV4, timeout: Duration) -> io::Result<Answer> {
    udp_ask_peer(addr, timeout).map(|(a, _)| a)
}

/// Like [`udp_ask`] (an unconnected socket: `sendto`, `recvfrom`), also returning the source
/// address the echo arrived from.
pub fn udp_ask_peer(addr: SocketAddrV4, timeout: Duration) -> io::Result<(Answer, SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"who", addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((parse_answer(&String::from_utf8_lossy(&buf[..n]))?, from))
}

/// What `xlb-echo ask` prints: the answer and the peer address the client's socket reported.
#[must_use]
pub fn format_asked(answer: &Answer, peer: SocketAddr) -> String {
    format!("pod={} client={} peer={peer}", answer.pod, answer.client)
}

/// Parses [`format_asked`]'s line.
pub fn parse_asked(line: &str) -> io::Result<(Answer, SocketAddr)> {
    let answer = parse_answer(line)?;
    let peer = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("peer=")?.parse().ok())
        .ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("no peer in {line:?}"))
        })?;
    Ok((answer, peer))
}

#[cfg(test)]
mod tests {
    use super::{parse_answer, pattern_chunk};

    #[test]
    fn pattern_is_position_dependent() {
        let whole = pattern_chunk(0, 4096);
        assert_eq!(&whole[1000..1100], &pattern_chunk(1000, 100)[..]);
        assert_ne!(pattern_chunk(0, 512), pattern_chunk(512, 512));
    }

    #[test]
    fn parses_answers() {
        let a = parse_answer("pod=tomcat6-a client=10.0.0.1:4000\n").expect("answer");
        assert_eq!(a.pod, "tomcat6-a");
        assert!(parse_answer("garbage").is_err());
    }
}
