//! The agent's HTTP endpoints, at kube-proxy's places: `/metrics` on the metrics address
//! (default 127.0.0.1:10249), `/healthz` (the process answers) and `/readyz` (the first full
//! sync is in the maps and the datapath is attached) on the health address (default
//! 127.0.0.1:10256); one address may serve both. Served by hyper's HTTP/1.1 server on the
//! agent's tokio runtime, configured to protect the agent: a request head of at most
//! [`MAX_HEAD`] bytes (431 beyond), [`HEAD_TIMEOUT`] to send it (then the connection is
//! closed), at most [`MAX_CONNECTIONS`] connections at once (more wait in the listen backlog),
//! `GET` and `HEAD` only (405), one request per connection. Probes and a Prometheus scraper
//! need no more.
use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, StatusCode,
    body::{Bytes, Incoming},
    header,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tracing::{debug, info};

use crate::ops::metrics::{self, Metrics};

/// kube-proxy's default metrics address.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:10249";
/// kube-proxy's health port, on loopback.
pub const DEFAULT_HEALTH_ADDR: &str = "127.0.0.1:10256";

/// Longest request head accepted (hyper's smallest read buffer).
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once per listener.
pub const MAX_CONNECTIONS: usize = 256;

/// How a listener protects itself (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub head_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            head_timeout: HEAD_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

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
    /// A fault that makes the agent unready while it lasts (e.g. pins it could not repair).
    fault: std::sync::Mutex<Option<&'static str>>,
}

impl Health {
    /// The first full sync is programmed and the datapath attached; stays so.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Ready, and no fault.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.fault().is_none()
    }

    /// Sets (Some) or clears (None) the fault that makes the agent unready.
    pub fn set_fault(&self, fault: Option<&'static str>) {
        *self
            .fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fault;
    }

    fn fault(&self) -> Option<&'static str> {
        *self
            .fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        ("/readyz", _, Some(h)) => Some(match (h.is_ready(), h.fault()) {
            (true, _) => Response::text(200, "ok\n"),
            (false, Some(fault)) => Response::text(503, &format!("not ready: {fault}\n")),
            (false, None) => Response::text(
                503,
                "not ready: the first sync is not programmed or the datapath not attached\n",
            ),
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
    let limits = Limits::default();
    // Port 0 asks for two ephemeral ports, not one shared listener.
    if metrics_addr == health_addr && metrics_addr.port() != 0 {
        let (listener, local) = bind(metrics_addr, "metrics, healthz, readyz").await?;
        tokio::spawn(serve(listener, both, limits));
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
        limits,
    ));
    tokio::spawn(serve(
        h,
        Routes {
            metrics: None,
            ..both
        },
        limits,
    ));
    Ok((m_local, h_local))
}

/// Answers connections on `listener` until the runtime stops, at most
/// `limits.max_connections` at once.
pub async fn serve(listener: TcpListener, routes: Routes, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // A slot first: past the cap, connections wait in the listen backlog.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, peer)) => {
                let routes = routes.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, routes, limits).await {
                        debug!(%peer, error = %e, "HTTP connection failed");
                    }
                    drop(slot);
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

/// Serves one connection: one request, answered, then closed.
async fn answer(stream: TcpStream, routes: Routes, limits: Limits) -> hyper::Result<()> {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = respond(&routes, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

/// The HTTP response of `routes` to `req`.
fn respond(routes: &Routes, req: &Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let r = route(routes, req.method().as_str(), req.uri().path());
    let head_only = req.method() == Method::HEAD;
    let len = r.body.len();
    let body = if head_only {
        Bytes::new()
    } else {
        Bytes::from(r.body)
    };
    let mut response = hyper::Response::new(Full::new(body));
    *response.status_mut() =
        StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(r.content_type),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    if r.status == 405 {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::{Health, Limits, Routes, route, serve, start};
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

    /// Request lines as hyper parses them: the query is dropped, HTTP/1.0 is served, a line
    /// without a version or with another protocol is refused.
    #[tokio::test]
    async fn request_lines() {
        let (metrics, health) = (metrics(), Arc::new(Health::default()));
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        start(addr, addr, &metrics, &health).await.expect("bind");
        assert_eq!(get(addr, "/metrics?x=1").await.0, 200);
        assert_eq!(raw(addr, "GET /readyz HTTP/1.0\r\n\r\n").await.0, 503);
        assert_eq!(raw(addr, "GET /healthz HTTP/1.0\r\n\r\n").await.0, 200);
        assert_eq!(raw(addr, "GET /readyz\r\n\r\n").await.0, 400);
        assert!(raw(addr, "GET /readyz SPDY/3\r\n\r\n").await.0 >= 400);
    }

    /// A client that never finishes its head is closed after the head timeout; 200 of them at
    /// once hold no one else up: `/metrics` answers meanwhile, and each that finishes its
    /// request is answered.
    #[tokio::test]
    async fn slow_and_many_clients_are_bounded() {
        let routes = Routes {
            metrics: Some(metrics()),
            health: Some(Arc::new(Health::default())),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            head_timeout: std::time::Duration::from_secs(1),
            max_connections: 256,
        };
        tokio::spawn(serve(listener, routes, limits));
        let mut slow = Vec::new();
        for _ in 0..200 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("write");
            slow.push(s);
        }
        let started = tokio::time::Instant::now();
        let (status, _, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("xlb_syncs_total"), "{body}");
        assert!(
            started.elapsed() < limits.head_timeout,
            "/metrics waited for the slow clients"
        );
        // Half of them finish their request within the timeout and are answered.
        let finishing: Vec<TcpStream> = slow.drain(..100).collect();
        for mut s in finishing {
            s.write_all(b"\r\n").await.expect("write");
            let mut text = String::new();
            s.read_to_string(&mut text).await.expect("read");
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        }
        // The others are closed once their time is up (EOF), well before three times it.
        for mut s in slow {
            let mut text = String::new();
            let read = tokio::time::timeout(limits.head_timeout * 3, s.read_to_string(&mut text))
                .await
                .expect("a slow client was not closed");
            assert!(read.is_ok_and(|_| !text.contains(" 200 ")), "{text}");
        }
    }

    /// Past the connection cap a client waits in the listen backlog until a slot frees (here
    /// when the one slot's slow client is timed out), then is served.
    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let routes = Routes {
            metrics: None,
            health: Some(Arc::new(Health::default())),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            head_timeout: std::time::Duration::from_secs(1),
            max_connections: 1,
        };
        tokio::spawn(serve(listener, routes, limits));
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let waiting = tokio::spawn(async move { get(addr, "/healthz").await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "served past the cap");
        let mut text = String::new();
        slow.read_to_string(&mut text).await.expect("closed");
        let (status, _, body) = waiting.await.expect("task");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
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
