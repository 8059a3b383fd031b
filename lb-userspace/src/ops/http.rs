//! The agent's HTTP endpoints, at kube-proxy's places: `/metrics` on the metrics address
//! (default 127.0.0.1:10249), `/healthz` (the process answers) and `/readyz` (the first full
//! sync is in the maps and the datapath is attached) on the health address (default
//! 127.0.0.1:10256); one address may serve both. A deliberately small HTTP/1.1 server on the
//! agent's tokio runtime: one `GET` or `HEAD` per connection, answered and closed, nothing
//! read past the request head. Probes and a Prometheus scraper need no more.
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::{debug, info};

use crate::ops::metrics::{self, Metrics};

/// kube-proxy's default metrics address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:10249";
/// kube-proxy's health port, on loopback.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:10256";

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("listening on {addr} ({what})")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Readiness of the agent.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// The first full sync is programmed and the datapath attached; stays so.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// What one listener serves.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    /// Serve `/metrics`.
    pub metrics: Option<Arc<Metrics>>,
    /// Serve `/healthz` and `/readyz`.
    pub health: Option<Arc<Health>>,
}

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

const TEXT: &str = "text/plain; charset=utf-8";

impl Response {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: TEXT,
            body: body.to_owned(),
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// The answer of `routes` to `method path` (a path without its query).
#[must_use]
pub fn route(routes: &Routes, method: &str, path: &str) -> Response {
    let found = match (path, &routes.metrics, &routes.health) {
        ("/metrics", Some(m), _) => Some(match m.encode() {
            Ok(body) => Response {
                status: 200,
                content_type: metrics::CONTENT_TYPE,
                body,
            },
            Err(_) => Response::text(500, "encoding the metrics failed\n"),
        }),
        ("/healthz" | "/livez", _, Some(_)) => Some(Response::text(200, "ok\n")),
        ("/readyz", _, Some(h)) => Some(if h.is_ready() {
            Response::text(200, "ok\n")
        } else {
            Response::text(
                503,
                "not ready: the first sync is not programmed or the datapath not attached\n",
            )
        }),
        _ => None,
    };
    match found {
        None => Response::text(404, "not found\n"),
        Some(_) if method != "GET" && method != "HEAD" => {
            Response::text(405, "only GET and HEAD\n")
        }
        Some(r) => r,
    }
}

/// Binds the metrics and health addresses (one listener when they are the same) and serves
/// them on the current runtime. Returns the bound addresses: metrics, then health.
pub async fn start(
    metrics_addr: SocketAddr,
    health_addr: SocketAddr,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> Result<(SocketAddr, SocketAddr), HttpError> {
    let bind = |addr, what| async move {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HttpError::Bind { addr, what, source })?;
        let local =
            listener
                .local_addr()
                .map_err(|source| HttpError::Bind { addr, what, source })?;
        info!(addr = %local, what, "serving");
        Ok::<_, HttpError>((listener, local))
    };
    let both = Routes {
        metrics: Some(Arc::clone(metrics)),
        health: Some(Arc::clone(health)),
    };
    // Port 0 asks for two ephemeral ports, not one shared listener.
    if metrics_addr == health_addr && metrics_addr.port() != 0 {
        let (listener, local) = bind(metrics_addr, "metrics, healthz, readyz").await?;
        tokio::spawn(serve(listener, both));
        return Ok((local, local));
    }
    let (m, m_local) = bind(metrics_addr, "metrics").await?;
    let (h, h_local) = bind(health_addr, "healthz, readyz").await?;
    tokio::spawn(serve(
        m,
        Routes {
            health: None,
            ..both.clone()
        },
    ));
    tokio::spawn(serve(
        h,
        Routes {
            metrics: None,
            ..both
        },
    ));
    Ok((m_local, h_local))
}

/// Answers connections on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, routes: Routes) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let routes = routes.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &routes).await {
                        debug!(%peer, error = %e, "HTTP connection failed");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and writes the answer.
async fn answer(mut stream: TcpStream, routes: &Routes) -> io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => return Err(io::ErrorKind::TimedOut.into()),
    };
    let (method, response) = match head {
        Head::Complete(text) => match parse_request_line(&text) {
            Some((method, path)) => (method.to_owned(), route(routes, method, path)),
            None => ("GET".to_owned(), Response::text(400, "bad request\n")),
        },
        Head::TooLarge => ("GET".to_owned(), Response::text(431, "request too large\n")),
        Head::Closed => return Ok(()),
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason_phrase(response.status),
        response.content_type,
        response.body.len()
    );
    if response.status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if method != "HEAD" {
        out.push_str(&response.body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}

enum Head {
    Complete(String),
    TooLarge,
    /// The client closed before finishing its request.
    Closed,
}

async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Head::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_end_of_head(&buf) {
            return Ok(Head::Complete(
                String::from_utf8_lossy(&buf[..end]).into_owned(),
            ));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Head::TooLarge);
        }
    }
}

/// Length of the head (blank line excluded) once it is complete.
fn find_end_of_head(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

/// Method and path (query dropped) of an `HTTP/1.x` request line.
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split_ascii_whitespace();
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return None;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Some((method, path))
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::{Health, Routes, parse_request_line, route, start};
    use crate::{datapath::loader::Capacities, ops::metrics::Metrics};

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&Capacities::small(), None).expect("metrics"))
    }

    /// Sends `request` raw and returns the status code, the headers and the body.
    async fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("a status");
        (status, head.to_owned(), body.to_owned())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line("GET /readyz HTTP/1.0"),
            Some(("GET", "/readyz"))
        );
        assert_eq!(parse_request_line("GET /readyz"), None);
        assert_eq!(parse_request_line("GET readyz HTTP/1.1"), None);
        assert_eq!(parse_request_line("GET /readyz SPDY/3"), None);
        assert_eq!(parse_request_line(""), None);
    }

    #[test]
    fn routes_answer_only_what_they_serve() {
        let health = Arc::new(Health::default());
        let h = Routes {
            metrics: None,
            health: Some(Arc::clone(&health)),
        };
        assert_eq!(route(&h, "GET", "/healthz").status, 200);
        assert_eq!(route(&h, "GET", "/readyz").status, 503);
        health.set_ready();
        assert_eq!(route(&h, "GET", "/readyz").status, 200);
        assert_eq!(route(&h, "GET", "/metrics").status, 404);
        assert_eq!(route(&h, "POST", "/healthz").status, 405);
        let m = Routes {
            metrics: Some(metrics()),
            health: None,
        };
        assert_eq!(route(&m, "GET", "/metrics").status, 200);
        assert_eq!(route(&m, "GET", "/healthz").status, 404);
    }

    #[tokio::test]
    async fn health_and_metrics_over_tcp() {
        let (metrics, health) = (metrics(), Arc::new(Health::default()));
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let (m, h) = start(any, any, &metrics, &health).await.expect("bind");
        assert_ne!(m, h, "two listeners");

        let (status, _, body) = get(h, "/healthz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        let (status, _, body) = get(h, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        health.set_ready();
        let (status, _, body) = get(h, "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert_eq!(get(h, "/metrics").await.0, 404, "metrics live elsewhere");

        let (status, head, body) = get(m, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        assert!(
            body.contains("# TYPE xlb_syncs_total counter\nxlb_syncs_total 0\n"),
            "{body}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(get(m, "/readyz").await.0, 404);
        assert_eq!(get(m, "/nope").await.0, 404);

        let (status, head, body) = raw(h, "HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!((status, body.as_str()), (200, ""), "{head}");
        assert!(head.contains("Content-Length: 3"), "{head}");
        let (status, head, _) = raw(h, "DELETE /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 405);
        assert!(head.contains("Allow: GET, HEAD"), "{head}");
        assert_eq!(raw(h, "nonsense\r\n\r\n").await.0, 400);
        // One byte past the limit, all of it read by the server (no reset from unread data).
        let mut huge = "GET /healthz HTTP/1.1\r\nX: ".to_owned();
        huge.push_str(&"a".repeat(super::MAX_HEAD + 1 - huge.len()));
        assert_eq!(raw(h, &huge).await.0, 431);
    }

    #[tokio::test]
    async fn one_address_serves_everything() {
        let (metrics, health) = (metrics(), Arc::new(Health::default()));
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let (m, h) = start(addr, addr, &metrics, &health).await.expect("bind");
        assert_eq!((m, h), (addr, addr));
        assert_eq!(get(addr, "/metrics").await.0, 200);
        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
    }

    #[tokio::test]
    async fn a_taken_address_is_an_error() {
        let (metrics, health) = (metrics(), Arc::new(Health::default()));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let err = start(addr, any, &metrics, &health)
            .await
            .expect_err("taken");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
