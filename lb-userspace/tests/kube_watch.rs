//! The Kubernetes source against a scripted API server: a small HTTP/1.1 server on 127.0.0.1
//! that answers kube's list requests with List JSON and its watch requests with chunked streams
//! of watch events, following a script per resource. It checks that the store converges to the
//! API server's final picture through bookmarks, a dropped connection, an expired watch (410) and
//! a paginated re-list, and that the re-list replaces the Services atomically.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lb_userspace::control::{
    source::{kube as kube_source, shared::SharedStore},
    store::Store,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// Bound on the whole scenario; it takes about 1–2 s (the watcher's backoff after the 410).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server holds the last page of the re-list back: a window in which a source
/// that applied a re-list before it completed would show a half-listed picture.
const LAST_PAGE_DELAY: Duration = Duration::from_millis(300);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---- objects as the API server sends them ----

fn service(name: &str, rv: u32) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string()},
        "spec": {
            "type": "NodePort",
            "clusterIP": format!("10.96.0.{rv}"),
            "ports": [{"port": 80, "targetPort": 8080, "nodePort": 32510, "protocol": "TCP"}],
            "selector": {"app": name},
        },
    })
}

/// A Service that k8s-openapi cannot read (`ports` must be a list).
fn broken_service(rv: u32) -> Value {
    json!({
        "metadata": {"name": "broken", "namespace": "default", "resourceVersion": rv.to_string()},
        "spec": {"ports": 7},
    })
}

fn endpoint_slice(name: &str, rv: u32, addresses: &[&str]) -> Value {
    let endpoints: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node-1"}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "resourceVersion": rv.to_string(),
            "labels": {"kubernetes.io/service-name": "tomcat6"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "resourceVersion": "7"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.11"}]},
    })
}

fn list(kind: &str, api_version: &str, rv: &str, next: Option<&str>, items: &[Value]) -> String {
    let mut metadata = json!({"resourceVersion": rv});
    if let Some(next) = next {
        metadata["continue"] = json!(next);
    }
    json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items})
        .to_string()
}

fn event(kind: &str, object: &Value) -> String {
    json!({"type": kind, "object": object}).to_string()
}

fn bookmark(kind: &str, api_version: &str, rv: &str) -> String {
    let object =
        json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv}});
    event("BOOKMARK", &object)
}

fn expired() -> String {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 105 (190)", "reason": "Expired", "code": 410,
    });
    event("ERROR", &status)
}

// ---- the scripted server ----

/// How a watch response ends after its events.
#[derive(Clone, Copy, Debug)]
enum End {
    /// The last chunk, as when the server's watch timeout ends the request.
    Clean,
    /// The connection closes mid-stream.
    Drop,
    /// The stream stays open until the test ends.
    Hold,
}

#[derive(Clone, Debug)]
enum Reply {
    List { body: String, delay: Duration },
    Watch { events: Vec<String>, end: End },
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    resource: String,
    query: BTreeMap<String, String>,
    /// Service keys in the store when the request arrived.
    services_then: Vec<String>,
}

impl Request {
    fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
    fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

struct Server {
    /// Per (resource, "list" | "watch"): the replies in order; the last one repeats.
    script: BTreeMap<(&'static str, &'static str), Vec<Reply>>,
    served: BTreeMap<(&'static str, &'static str), usize>,
    log: Vec<Request>,
    /// Service keys in the store just before the re-list's last page was sent.
    services_before_last_page: Option<Vec<String>>,
    last_page_sent: Option<Instant>,
}

fn script() -> BTreeMap<(&'static str, &'static str), Vec<Reply>> {
    let now = |body| Reply::List {
        body,
        delay: Duration::ZERO,
    };
    let hold = Reply::Watch {
        events: Vec::new(),
        end: End::Hold,
    };
    let (svc, v1) = ("Service", "v1");
    let (slice, discovery) = ("EndpointSlice", "discovery.k8s.io/v1");
    let tomcat6_slice = |rv, addresses: &[&str]| endpoint_slice("tomcat6-abc", rv, addresses);
    BTreeMap::from([
        (
            ("services", "list"),
            vec![
                now(list(
                    "ServiceList",
                    v1,
                    "100",
                    None,
                    &[service("tomcat6", 10), service("legacy", 11)],
                )),
                // The re-list after the 410, in two pages; the second one comes late.
                now(list(
                    "ServiceList",
                    v1,
                    "200",
                    Some("page-2"),
                    &[service("tomcat6", 10), service("web", 150)],
                )),
                Reply::List {
                    body: list("ServiceList", v1, "200", None, &[broken_service(151)]),
                    delay: LAST_PAGE_DELAY,
                },
            ],
        ),
        (
            ("services", "watch"),
            vec![
                Reply::Watch {
                    events: vec![bookmark(svc, v1, "105")],
                    end: End::Clean,
                },
                Reply::Watch {
                    events: vec![expired()],
                    end: End::Clean,
                },
                hold.clone(),
            ],
        ),
        (
            ("endpointslices", "list"),
            vec![now(list(
                "EndpointSliceList",
                discovery,
                "100",
                None,
                &[tomcat6_slice(
                    12,
                    &["10.244.1.5", "10.244.1.6", "10.244.1.7"],
                )],
            ))],
        ),
        (
            ("endpointslices", "watch"),
            vec![
                Reply::Watch {
                    events: vec![
                        // Unreadable (`endpoints` must be a list): refused, the watch goes on.
                        event(
                            "ADDED",
                            &json!({"apiVersion": discovery, "kind": slice,
                                "metadata": {"name": "broken-x", "namespace": "default",
                                    "resourceVersion": "101"},
                                "addressType": "IPv4", "endpoints": "x"}),
                        ),
                        event(
                            "MODIFIED",
                            &tomcat6_slice(102, &["10.244.1.5", "10.244.1.6"]),
                        ),
                        bookmark(slice, discovery, "110"),
                    ],
                    end: End::Drop,
                },
                hold.clone(),
            ],
        ),
        (
            ("nodes", "list"),
            vec![now(list("NodeList", v1, "100", None, &[node("node-1")]))],
        ),
        (("nodes", "watch"), vec![hold]),
    ])
}

impl Server {
    fn new() -> Self {
        Self {
            script: script(),
            served: BTreeMap::new(),
            log: Vec::new(),
            services_before_last_page: None,
            last_page_sent: None,
        }
    }

    fn reply(&mut self, request: &Request) -> Option<Reply> {
        let resource = match request.resource.as_str() {
            "services" => "services",
            "endpointslices" => "endpointslices",
            "nodes" => "nodes",
            _ => return None,
        };
        let verb = if request.is_watch() { "watch" } else { "list" };
        let replies = self.script.get(&(resource, verb))?;
        let n = self.served.entry((resource, verb)).or_default();
        let reply = replies.get(*n).or(replies.last()).cloned();
        *n += 1;
        reply
    }
}

fn service_keys(store: &Store) -> Vec<String> {
    store.services().map(|(k, _)| k.to_string()).collect()
}

/// Splits `/api/v1/services?a=b` into the resource ("services") and the decoded query.
fn parse_target(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let resource = path.rsplit('/').next().unwrap_or_default().to_owned();
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect();
    (resource, query)
}

/// `application/x-www-form-urlencoded` decoding.
fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                out.push(u8::from_str_radix(&hex, 16).expect("percent escape"));
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).expect("UTF-8 query")
}

async fn serve(listener: TcpListener, server: Arc<Mutex<Server>>, store: Arc<SharedStore>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(answer(socket, Arc::clone(&server), Arc::clone(&store)));
    }
}

/// Answers one request, then closes the connection (`Connection: close`).
async fn answer(mut socket: TcpStream, server: Arc<Mutex<Server>>, store: Arc<SharedStore>) {
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read_buf(&mut head).await {
            Ok(0) | Err(_) => return,
            Ok(_) => assert!(head.len() < 65536, "request head too long"),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let mut request_line = head.lines().next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let (resource, query) = parse_target(request_line.next().unwrap_or_default());
    let request = Request {
        method,
        resource,
        query,
        services_then: store.read(|s, _| service_keys(s)),
    };
    let reply = {
        let mut server = lock(&server);
        server.log.push(request.clone());
        server.reply(&request)
    };
    let result = match reply {
        None => {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#;
            write_body(&mut socket, "404 Not Found", body).await
        }
        Some(Reply::List { body, delay }) => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                let mut server = lock(&server);
                server.services_before_last_page = Some(store.read(|s, _| service_keys(s)));
                server.last_page_sent = Some(Instant::now());
            }
            write_body(&mut socket, "200 OK", &body).await
        }
        Some(Reply::Watch { events, end }) => write_stream(&mut socket, &events, end).await,
    };
    // The client may hang up first (it drops a watch after a 410); that is not a failure.
    drop(result);
}

async fn write_body(socket: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

async fn write_stream(socket: &mut TcpStream, events: &[String], end: End) -> std::io::Result<()> {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    socket.write_all(head.as_bytes()).await?;
    for event in events {
        let line = format!("{event}\n");
        let chunk = format!("{:x}\r\n{line}\r\n", line.len());
        socket.write_all(chunk.as_bytes()).await?;
        socket.flush().await?;
        // Separate chunks, as a real watch delivers them.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match end {
        End::Clean => {
            socket.write_all(b"0\r\n\r\n").await?;
            socket.shutdown().await
        }
        End::Drop => socket.shutdown().await,
        End::Hold => {
            std::future::pending::<()>().await;
            Ok(())
        }
    }
}

// ---- the test ----

/// The store's Services at one generation, and when they were seen.
#[derive(Debug)]
struct Snapshot {
    at: Instant,
    services: Vec<String>,
}

fn final_picture(store: &Store, invalid: &[lb_userspace::control::invalid::Invalid]) -> bool {
    let endpoints = store
        .endpoint_slices()
        .map(|(k, s)| (k.to_string(), s.endpoints.len()))
        .collect::<Vec<_>>();
    let mut refused: Vec<String> = invalid
        .iter()
        .map(|i| format!("{} {}/{}", i.kind, i.namespace, i.name))
        .collect();
    refused.sort();
    service_keys(store) == ["default/tomcat6", "default/web"]
        && endpoints == [("default/tomcat6-abc".to_owned(), 2)]
        && store.node("node-1").is_some()
        && refused == ["EndpointSlice default/broken-x", "Service default/broken"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_the_api_server_through_a_relist() {
    // Shown when the test fails.
    let filter = tracing_subscriber::EnvFilter::new("lb_userspace=debug,kube=debug");
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(filter)
        .try_init();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let server = Arc::new(Mutex::new(Server::new()));
    let store = Arc::new(SharedStore::new());
    tokio::spawn(serve(listener, Arc::clone(&server), Arc::clone(&store)));

    // Record the Services at every change the store announces.
    let snapshots = Arc::new(Mutex::new(Vec::<Snapshot>::new()));
    let mut changes = store.subscribe();
    tokio::spawn({
        let (store, snapshots) = (Arc::clone(&store), Arc::clone(&snapshots));
        async move {
            while changes.changed().await.is_ok() {
                let services = store.read(|s, _| service_keys(s));
                lock(&snapshots).push(Snapshot {
                    at: Instant::now(),
                    services,
                });
            }
        }
    });

    let url = format!("http://{address}").parse().expect("URL");
    let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
    let source = tokio::spawn(kube_source::run(
        client,
        "node-1".to_owned(),
        Arc::clone(&store),
    ));

    let mut waiter = store.subscribe();
    let converged = tokio::time::timeout(SCENARIO_TIMEOUT, async {
        while !store.read(final_picture) {
            waiter.changed().await.expect("store alive");
        }
    })
    .await;
    let requests = lock(&server).log.clone();
    assert!(
        converged.is_ok(),
        "the store did not converge: services {:?}, requests {requests:#?}",
        store.read(|s, _| service_keys(s)),
    );
    assert!(store.is_synced());
    assert!(!source.is_finished(), "the source stopped: {source:?}");
    // Let the held watches settle so the log is complete, then stop the source.
    tokio::time::sleep(Duration::from_millis(50)).await;
    source.abort();

    check_requests(&lock(&server).log);
    let server = lock(&server);
    check_atomic_relist(&server, &lock(&snapshots));
}

/// The requests kube sent: lists and watches only, from the right resource versions.
fn check_requests(log: &[Request]) {
    assert!(log.iter().all(|r| r.method == "GET"), "{log:#?}");
    let of = |resource: &str| -> Vec<&Request> {
        log.iter().filter(|r| r.resource == resource).collect()
    };
    for watch in log.iter().filter(|r| r.is_watch()) {
        assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    }

    let services = of("services");
    let calls: Vec<(bool, Option<&str>, Option<&str>)> = services
        .iter()
        .map(|r| {
            (
                r.is_watch(),
                r.param("resourceVersion"),
                r.param("continue"),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            (false, None, None),
            (true, Some("100"), None),
            // Resumed from the bookmark after a clean end of the watch.
            (true, Some("105"), None),
            // 410: a fresh list, paginated.
            (false, None, None),
            (false, None, Some("page-2")),
            (true, Some("200"), None),
        ],
        "{services:#?}"
    );

    let slices: Vec<(bool, Option<&str>)> = of("endpointslices")
        .iter()
        .map(|r| (r.is_watch(), r.param("resourceVersion")))
        .collect();
    // Resumed from the bookmark after the connection dropped.
    assert_eq!(
        slices,
        [(false, None), (true, Some("100")), (true, Some("110"))]
    );

    let nodes = of("nodes");
    assert_eq!(nodes.len(), 2, "{nodes:#?}");
    for request in nodes {
        assert_eq!(request.param("fieldSelector"), Some("metadata.name=node-1"));
    }
}

/// The re-list replaced the Services in one step, only once it was complete.
fn check_atomic_relist(server: &Server, snapshots: &[Snapshot]) {
    let before = ["default/legacy", "default/tomcat6"];
    let after = ["default/tomcat6", "default/web"];

    // While the re-list was under way, the store still held the old picture.
    let relist: Vec<&Request> = server
        .log
        .iter()
        .filter(|r| r.resource == "services" && !r.is_watch())
        .skip(1)
        .collect();
    for request in &relist {
        assert_eq!(request.services_then, before, "{request:?}");
    }
    assert_eq!(
        server.services_before_last_page.as_deref(),
        Some(&before.map(str::to_owned)[..])
    );

    // Every picture the store ever showed is empty, the old one or the new one, in that order:
    // never legacy gone before web came, never both.
    let mut phase = 0;
    for snapshot in snapshots {
        let now = match snapshot.services.as_slice() {
            [] => 0,
            s if s == before => 1,
            s if s == after => 2,
            other => panic!("a half-replaced picture: {other:?} in {snapshots:#?}"),
        };
        assert!(now >= phase, "went back: {snapshots:#?}");
        phase = now;
    }
    assert_eq!(phase, 2);
    let first_after = snapshots
        .iter()
        .find(|s| s.services == after)
        .map(|s| s.at)
        .expect("the new picture was seen");
    let last_page_sent = server.last_page_sent.expect("the last page was sent");
    assert!(
        first_after >= last_page_sent,
        "the new picture appeared before the re-list completed"
    );
}
