//! The lab's backend: answers HTTP/1.1 over TCP and datagrams over UDP with the pod's name and
//! the client address it saw, so tests know which pod answered and whether the client's
//! address was kept. `GET /bytes/N` streams N bytes of a fixed pattern (large transfers).
//!
//! Usage: `xlb-echo <pod-name> <port>...` (TCP and UDP on each port, all addresses).
//!
//! `xlb-echo ask tcp|tcp6|udp <address:port>` is the client side (tcp6: a dual-stack socket to
//! the IPv4-mapped address), for tests that need a process
//! of its own (one in a given cgroup): one request, then `pod=… client=… peer=…` where peer
//! is the address the socket reported (`getpeername`, or the source of the echo).
//!
//! `xlb-echo sock-churn <address:port> <sockets> <every>`: connects and closes `sockets` UDP
//! sockets to `address:port` one after another (as short-lived DNS clients do) while one
//! long-lived socket, connected once, asks `address:port` at the start, after every `every`
//! sockets and at the end: one line `sockets=… from=… pod=…` (or `sockets=… error=…`) per ask,
//! where `from` is the source its `recvfrom()` reported; then `done sockets=… ms=…`.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::Duration,
};

use lb_lab::echo::{self, pattern_chunk};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let name = args.next();
    if name.as_deref() == Some("ask") {
        return ask(args.next().as_deref(), args.next().as_deref());
    }
    if name.as_deref() == Some("udp-session") {
        let addr = args.next().and_then(|a| a.parse::<SocketAddrV4>().ok());
        let count = args.next().and_then(|n| n.parse::<u32>().ok());
        if let (Some(addr), Some(count)) = (addr, count) {
            return udp_session(addr, count);
        }
        eprintln!("usage: xlb-echo udp-session <address:port> <count>");
        return ExitCode::FAILURE;
    }
    if name.as_deref() == Some("sock-churn") {
        let addr = args.next().and_then(|a| a.parse::<SocketAddrV4>().ok());
        let sockets = args.next().and_then(|n| n.parse::<u64>().ok());
        let every = args.next().and_then(|n| n.parse::<u64>().ok());
        if let (Some(addr), Some(sockets), Some(every)) = (addr, sockets, every.filter(|&e| e > 0))
        {
            return sock_churn(addr, sockets, every);
        }
        eprintln!("usage: xlb-echo sock-churn <address:port> <sockets> <every>");
        return ExitCode::FAILURE;
    }
    let ports: Vec<u16> = args.filter_map(|p| p.parse().ok()).collect();
    let Some(name) = name.filter(|_| !ports.is_empty()) else {
        eprintln!("usage: xlb-echo <pod-name> <port>...");
        return ExitCode::FAILURE;
    };
    let mut listeners = Vec::new();
    for port in ports {
        match (
            TcpListener::bind(("0.0.0.0", port)),
            UdpSocket::bind(("0.0.0.0", port)),
        ) {
            (Ok(t), Ok(u)) => listeners.push((t, u)),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("xlb-echo: bind {port}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut threads = Vec::new();
    for (tcp, udp) in listeners {
        let udp_name = name.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("pod={udp_name} client={peer}\n").as_bytes(), peer);
            }
        }));
        let tcp_name = name.clone();
        threads.push(thread::spawn(move || {
            for conn in tcp.incoming().flatten() {
                let name = tcp_name.clone();
                thread::spawn(move || serve(&name, conn));
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    ExitCode::SUCCESS
}

fn ask(proto: Option<&str>, addr: Option<&str>) -> ExitCode {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let Some(addr) = addr.and_then(|a| a.parse::<SocketAddrV4>().ok()) else {
        eprintln!("usage: xlb-echo ask tcp|tcp6|udp <address:port>");
        return ExitCode::FAILURE;
    };
    let asked = match proto {
        Some("tcp") => echo::http_get_peer(addr, TIMEOUT),
        Some("udp") => echo::udp_ask_peer(addr, TIMEOUT),
        Some("tcp6") => echo::http_get_peer_mapped(addr, TIMEOUT),
        _ => {
            eprintln!("usage: xlb-echo ask tcp|tcp6|udp <address:port>");
            return ExitCode::FAILURE;
        }
    };
    match asked {
        Ok((answer, peer)) => {
            println!("{}", echo::format_asked(&answer, peer));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xlb-echo: asking {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A long-lived connected UDP socket asking `addr` every 50 ms, `count` times: one line per
/// answer (`pod=…`) or error (`error=…`); after an error it connects a new socket.
fn udp_session(addr: SocketAddrV4, count: u32) -> ExitCode {
    let connect = || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.connect(addr)?;
        Ok(s)
    };
    let mut sock = connect();
    let mut buf = [0u8; 512];
    for _ in 0..count {
        let answer = sock
            .as_ref()
            .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
            .and_then(|s| {
                s.send(b"who")?;
                let n = s.recv(&mut buf)?;
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
            });
        match answer {
            Ok(line) => println!("{line}"),
            Err(e) => {
                println!("error={e}");
                sock = connect();
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    ExitCode::SUCCESS
}

/// See the module's usage. Fails only when the long-lived socket cannot be made; a churned
/// socket that cannot be made is reported and ends the churn.
fn sock_churn(addr: SocketAddrV4, sockets: u64, every: u64) -> ExitCode {
    let long_lived = match UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.set_read_timeout(Some(Duration::from_secs(2))).map(|()| s))
        .and_then(|s| s.connect(addr).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xlb-echo: socket: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut buf = [0u8; 512];
    let ask = |done: u64, buf: &mut [u8]| {
        let answer = long_lived.send(b"who").and_then(|_| {
            let (n, from) = long_lived.recv_from(buf)?;
            Ok((from, String::from_utf8_lossy(&buf[..n]).trim().to_owned()))
        });
        match answer {
            Ok((from, line)) => println!("sockets={done} from={from} {line}"),
            Err(e) => println!("sockets={done} error={e}"),
        }
    };
    let start = std::time::Instant::now();
    ask(0, &mut buf);
    let mut done = 0;
    while done < sockets {
        let churned = UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(addr));
        if let Err(e) = churned {
            println!("sockets={done} error=churned socket: {e}");
            break;
        }
        done += 1;
        if done % every == 0 || done == sockets {
            ask(done, &mut buf);
        }
    }
    println!("done sockets={done} ms={}", start.elapsed().as_millis());
    ExitCode::SUCCESS
}

/// Serves HTTP requests on one connection until the client closes it, or, as HTTP servers
/// (Tomcat among them) do, closes it itself after a response to an HTTP/1.0 request without
/// keep-alive or a request with `Connection: close`: the server then closes first, and its
/// side of the connection goes to `TIME_WAIT`.
fn serve(name: &str, conn: TcpStream) {
    let Ok(peer) = conn.peer_addr() else { return };
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut close = request_line.trim_end().ends_with("HTTP/1.0");
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("connection:") {
                close = v.trim() != "keep-alive";
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let ok = if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            send_bytes(&mut out, name, n)
        } else {
            let body = format!("pod={name} client={peer}\n");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Pod: {name}\r\n\r\n",
                body.len()
            );
            // One write: a second small write would wait for the client's delayed ACK
            // (Nagle), adding ~40 ms to every request on a kept-alive connection.
            out.write_all(format!("{head}{body}").as_bytes()).is_ok()
        };
        if !ok || close {
            // Dropping the stream closes it: the server's FIN goes first.
            return;
        }
    }
}

fn send_bytes(out: &mut TcpStream, name: &str, n: u64) -> bool {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nX-Pod: {name}\r\n\r\n");
    if out.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut sent = 0u64;
    while sent < n {
        let chunk = pattern_chunk(sent, (n - sent).min(64 * 1024) as usize);
        if out.write_all(&chunk).is_err() {
            return false;
        }
        sent += chunk.len() as u64;
    }
    true
}
