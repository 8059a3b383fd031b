//! The manifest source: reads a file, or every `*.yaml`/`*.yml`/`*.json` file of a directory (not
//! recursive, in name order), the way `kubectl apply -f` would, and puts the Services,
//! EndpointSlices and Nodes it finds into a [`Store`]. Files hold multi-document YAML or a stream
//! of JSON objects; `kind: List` (and `*List`) objects contribute their `items`. Other kinds are
//! ignored. A document that cannot be read is reported as [`Invalid`] and the rest still loads.
//! [`watch`] keeps a [`SharedStore`] up to date: it re-reads everything and replaces the store
//! whenever a cheap fingerprint of the files (paths, sizes, mtimes, inodes) changes and what
//! they hold changed.
use std::{
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    serde::de::DeserializeOwned,
};
use serde_json::Value;

use crate::control::{
    invalid::{Invalid, reason},
    source::shared::SharedStore,
    store::{Store, StoredKind},
};

/// Readiness name of the manifest source.
pub const SOURCE: &str = "manifests";

/// File name extensions read from a directory (as kubectl does).
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Errors of the manifest source: only the path itself failing; bad content is [`Invalid`].
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is neither a file nor a directory")]
    NotFileOrDirectory(PathBuf),
}

/// Reads `path` (a file or a directory) into a fresh store. Returns the store and the documents
/// or objects that were refused.
pub fn load(path: &Path) -> Result<(Store, Vec<Invalid>), ManifestError> {
    let mut loaded = Loaded::default();
    for file in files(path)? {
        let bytes = fs::read(&file).map_err(|source| ManifestError::Io {
            path: file.clone(),
            source,
        })?;
        let origin = file.display().to_string();
        match String::from_utf8(bytes) {
            Ok(text) => loaded.add_text(&text, &origin),
            Err(e) => loaded.refuse(
                &Location::whole(&origin),
                &Identity::default(),
                reason::PARSE_ERROR,
                &format!("not UTF-8: {e}"),
            ),
        }
    }
    tracing::debug!(
        path = %path.display(),
        services = loaded.store.count::<Service>(),
        endpoint_slices = loaded.store.count::<EndpointSlice>(),
        nodes = loaded.store.count::<Node>(),
        invalid = loaded.invalid.len(),
        "manifests loaded"
    );
    Ok((loaded.store, loaded.invalid))
}

/// Reads manifest text (what one file holds) into `store`, appending refusals to `invalid`.
/// `origin` names the text in messages (a file path, "stdin", a test name).
pub fn load_str(text: &str, origin: &str, store: &mut Store, invalid: &mut Vec<Invalid>) {
    let mut loaded = Loaded {
        store: std::mem::take(store),
        invalid: std::mem::take(invalid),
    };
    loaded.add_text(text, origin);
    *store = loaded.store;
    *invalid = loaded.invalid;
}

/// Loads `path` into `store` (registered as [`SOURCE`]), then polls the files every `interval`
/// and re-loads them when their fingerprint changes; never returns. The source is synced after
/// the first successful load. A load that fails (the path vanished or cannot be read) is logged
/// and the store keeps what it had; the next change of the fingerprint tries again.
pub async fn watch(path: PathBuf, store: Arc<SharedStore>, interval: Duration) {
    store.register(SOURCE);
    let path: Arc<Path> = path.into();
    // tokio's interval refuses a zero period.
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Fingerprint> = None;
    // The refusals of the last load given to the store; None before the first one.
    let mut stored_invalid: Option<Vec<Invalid>> = None;
    loop {
        ticks.tick().await;
        // Reading files blocks: keep it off the runtime's worker threads.
        let path_ = Arc::clone(&path);
        let polled = tokio::task::spawn_blocking(move || {
            let loaded = poll(&path_, &mut last);
            (last, loaded)
        });
        let loaded = match polled.await {
            Ok((fingerprint, loaded)) => {
                last = fingerprint;
                loaded
            }
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "reading manifests failed");
                last = None;
                None
            }
        };
        match loaded {
            None => {}
            Some(Ok((fresh, invalid))) => {
                // A touched file, or a re-read of a racy one, changes nothing: no wake-up.
                let unchanged = stored_invalid.as_ref() == Some(&invalid)
                    && store.read(|current, _| *current == fresh);
                if unchanged {
                    tracing::debug!(path = %path.display(), "manifests unchanged");
                    continue;
                }
                tracing::info!(
                    path = %path.display(),
                    services = fresh.count::<Service>(),
                    endpoint_slices = fresh.count::<EndpointSlice>(),
                    nodes = fresh.count::<Node>(),
                    invalid = invalid.len(),
                    "manifests read"
                );
                stored_invalid = Some(invalid.clone());
                store.replace(SOURCE, fresh, invalid);
            }
            Some(Err(error)) => tracing::warn!(
                path = %path.display(),
                error = %error,
                "cannot read manifests; keeping the previous ones"
            ),
        }
    }
}

/// How close to the fingerprint's own time a file's mtime makes the fingerprint untrustworthy:
/// mtimes advance in clock ticks (a few ms), so a file written again within the same tick, at the
/// same size, would keep its stamp. Such a fingerprint is taken again at the next poll.
const RACY_WINDOW: Duration = Duration::from_millis(100);

/// Takes the fingerprint of `path` and, if it differs from `last`, loads the manifests and
/// records the fingerprint. The fingerprint is taken first, so a change made during the load
/// shows at the next poll.
fn poll(
    path: &Path,
    last: &mut Option<Fingerprint>,
) -> Option<Result<(Store, Vec<Invalid>), ManifestError>> {
    let taken = SystemTime::now();
    let now = Fingerprint::of(path);
    if last.as_ref() == Some(&now) {
        return None;
    }
    *last = (!now.is_racy(taken)).then_some(now);
    Some(load(path))
}

/// What the manifest files look like from outside: enough to notice an edit, an added or
/// removed file, or a `ConfigMap` mount swapping its `..data` link (new inodes), without reading
/// any content.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fingerprint {
    Unreadable,
    Files(Vec<FileStamp>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    device: u64,
    inode: u64,
}

impl Fingerprint {
    fn of(path: &Path) -> Self {
        let Ok(files) = files(path) else {
            return Self::Unreadable;
        };
        let stamps = files.into_iter().map(|file| {
            let meta = fs::metadata(&file).ok()?;
            Some(FileStamp {
                len: meta.len(),
                modified: meta.modified().ok(),
                device: meta.dev(),
                inode: meta.ino(),
                path: file,
            })
        });
        stamps
            .collect::<Option<Vec<_>>>()
            .map_or(Self::Unreadable, Self::Files)
    }

    /// Some file was modified so shortly before `taken` that it could change again unseen.
    fn is_racy(&self, taken: SystemTime) -> bool {
        let Self::Files(stamps) = self else {
            return false;
        };
        stamps
            .iter()
            .any(|s| s.modified.is_none_or(|m| m + RACY_WINDOW > taken))
    }
}

/// The files `path` stands for, in the order they are read.
fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let io_error = |source| ManifestError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(io_error)?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    if !meta.is_dir() {
        return Err(ManifestError::NotFileOrDirectory(path.to_owned()));
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let file = entry.path();
        let wanted = file
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e));
        // Hidden entries are editor and ConfigMap-mount internals (`..data`).
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        // fs::metadata follows symlinks: ConfigMap mounts link every file.
        if wanted && !hidden && fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Where a document sits, for messages: file, 1-based document number among the non-empty
/// documents of the file, its first line, and the item number inside a List.
#[derive(Clone, Debug)]
struct Location<'a> {
    origin: &'a str,
    document: usize,
    line: usize,
    item: Option<usize>,
}

impl<'a> Location<'a> {
    fn whole(origin: &'a str) -> Self {
        Self {
            origin,
            document: 0,
            line: 0,
            item: None,
        }
    }
}

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.origin)?;
        if self.document > 0 {
            write!(f, " document {} (line {})", self.document, self.line)?;
        }
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        Ok(())
    }
}

/// What a raw document says about itself, as far as it can be read.
#[derive(Default)]
struct Identity {
    kind: &'static str,
    namespace: String,
    name: String,
}

impl Identity {
    fn of(value: &Value, kind: &'static str) -> Self {
        let meta = value.get("metadata");
        let field = |f: &str| {
            meta.and_then(|m| m.get(f))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self {
            kind,
            namespace: field("namespace"),
            name: field("name"),
        }
    }
}

#[derive(Default)]
struct Loaded {
    store: Store,
    invalid: Vec<Invalid>,
}

impl Loaded {
    fn add_text(&mut self, text: &str, origin: &str) {
        // kubectl's decoder sniffs the same way: a leading brace means a JSON stream.
        if text.trim_start().starts_with('{') {
            self.add_json(text, origin);
        } else {
            self.add_yaml(text, origin);
        }
    }

    fn add_json(&mut self, text: &str, origin: &str) {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        let mut document = 0;
        loop {
            let start = stream.byte_offset();
            let Some(next) = stream.next() else { break };
            document += 1;
            let at = Location {
                origin,
                document,
                line: line_at(text, start),
                item: None,
            };
            match next {
                Ok(value) => self.add_value(value, &at),
                Err(e) => {
                    // A JSON stream cannot be resynchronised after a syntax error.
                    self.refuse(
                        &at,
                        &Identity::default(),
                        reason::PARSE_ERROR,
                        &e.to_string(),
                    );
                    break;
                }
            }
        }
    }

    fn add_yaml(&mut self, text: &str, origin: &str) {
        for (document, (line, chunk)) in yaml_documents(text).into_iter().enumerate() {
            let at = Location {
                origin,
                document: document + 1,
                line,
                item: None,
            };
            match serde_yaml::from_str::<Value>(chunk) {
                Ok(value) => self.add_value(value, &at),
                Err(e) => {
                    self.refuse(
                        &at,
                        &Identity::default(),
                        reason::PARSE_ERROR,
                        &e.to_string(),
                    );
                }
            }
        }
    }

    fn add_value(&mut self, value: Value, at: &Location<'_>) {
        if value.is_null() {
            return;
        }
        if !value.is_object() {
            let detail = "not a Kubernetes object (expected a mapping)";
            self.refuse(at, &Identity::default(), reason::PARSE_ERROR, detail);
            return;
        }
        let field = |name| value.get(name).and_then(Value::as_str).map(str::to_owned);
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let (Some(api_version), Some(kind)) = (api_version, kind) else {
            let detail = "not a Kubernetes object (no apiVersion or kind)";
            self.refuse(
                at,
                &Identity::of(&value, "Document"),
                reason::PARSE_ERROR,
                detail,
            );
            return;
        };
        match kind.as_str() {
            "Service" => self.decode::<Service>(&api_version, value, at),
            "EndpointSlice" => self.decode::<EndpointSlice>(&api_version, value, at),
            "Node" => self.decode::<Node>(&api_version, value, at),
            _ if kind.ends_with("List") && value.get("items").is_some_and(Value::is_array) => {
                self.add_list(value, at);
            }
            _ => tracing::debug!(%at, api_version, kind, "ignoring a kind xlb does not use"),
        }
    }

    fn add_list(&mut self, mut value: Value, at: &Location<'_>) {
        let items = match value.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        for (i, item) in items.into_iter().enumerate() {
            let at = Location {
                item: Some(i + 1),
                ..at.clone()
            };
            self.add_value(item, &at);
        }
    }

    fn decode<K: StoredKind + DeserializeOwned>(
        &mut self,
        api_version: &str,
        value: Value,
        at: &Location<'_>,
    ) {
        let identity = Identity::of(&value, K::KIND);
        if api_version != K::API_VERSION {
            let detail = format!("{} {api_version} (xlb reads {})", K::KIND, K::API_VERSION);
            self.refuse(at, &identity, reason::UNSUPPORTED_API_VERSION, &detail);
            return;
        }
        let object = match serde_json::from_value::<K>(value) {
            Ok(object) => object,
            Err(e) => {
                self.refuse(at, &identity, reason::PARSE_ERROR, &e.to_string());
                return;
            }
        };
        match self.store.apply(object) {
            Ok(None) => {}
            Ok(Some(_)) => tracing::warn!(
                %at,
                kind = K::KIND,
                namespace = identity.namespace,
                name = identity.name,
                "object defined twice; the later definition wins"
            ),
            Err(e) => self.refuse(at, &identity, reason::MISSING_NAME, &e.to_string()),
        }
    }

    fn refuse(
        &mut self,
        at: &Location<'_>,
        identity: &Identity,
        reason: &'static str,
        detail: &str,
    ) {
        let kind = if identity.kind.is_empty() {
            "Document"
        } else {
            identity.kind
        };
        tracing::warn!(
            %at,
            kind,
            namespace = identity.namespace,
            name = identity.name,
            reason,
            detail,
            "skipping a manifest document"
        );
        self.invalid.push(Invalid {
            kind,
            namespace: identity.namespace.clone(),
            name: identity.name.clone(),
            reason,
            detail: format!("{at}: {detail}"),
        });
    }
}

/// Splits multi-document YAML at `---` lines the way kubectl does (textually, so one broken
/// document does not take the others with it). Returns each non-empty document with its first
/// line number (1-based).
fn yaml_documents(text: &str) -> Vec<(usize, &str)> {
    let mut documents = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            documents.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    documents.push((start_line, &text[start..]));
    // Number each document by its first line that says something.
    documents
        .into_iter()
        .filter_map(|(line, doc)| Some((line + first_content_line(doc)?, doc)))
        .collect()
}

/// `---`, optionally followed by spaces or a comment.
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---").is_some_and(|rest| {
        let rest = rest.trim();
        rest.is_empty() || rest.starts_with('#')
    })
}

/// The 0-based index of the first line of `doc` that is neither blank nor a comment; None when
/// the document is empty.
fn first_content_line(doc: &str) -> Option<usize> {
    doc.lines().position(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#')
    })
}

/// 1-based line of a byte offset, skipping the whitespace that precedes the next value.
fn line_at(text: &str, offset: usize) -> usize {
    let rest = text.get(offset..).unwrap_or_default();
    let skipped = rest.len() - rest.trim_start().len();
    let end = (offset + skipped).min(text.len());
    text.get(..end).unwrap_or(text).matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::store::{ObjectKey, StoredService};

    fn read(text: &str) -> (Store, Vec<Invalid>) {
        let mut store = Store::new();
        let mut invalid = Vec::new();
        load_str(text, "test.yaml", &mut store, &mut invalid);
        (store, invalid)
    }

    fn keys<K: StoredKind>(store: &Store) -> Vec<String> {
        store.iter::<K>().map(|(k, _)| k.to_string()).collect()
    }

    const SERVICE_A: &str = "
apiVersion: v1
kind: Service
metadata: {name: a, namespace: web}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
";

    #[test]
    fn the_tomcat6_example_loads_the_service_and_ignores_the_deployment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tomcat6.yaml");
        let (store, invalid) = load(&path).expect("examples/tomcat6.yaml is readable");
        assert!(invalid.is_empty(), "{invalid:?}");
        assert_eq!(keys::<Service>(&store), ["default/tomcat6"]);
        assert_eq!(store.count::<EndpointSlice>(), 0);
        let svc = store
            .get::<Service>(&ObjectKey::new("default", "tomcat6"))
            .expect("stored");
        // The store keeps what the model reads (not the selector: xlb follows the
        // EndpointSlices the selector produces).
        let spec = svc.spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(cluster_ip(svc).as_deref(), Some("10.96.0.10"));
        let ports = &spec.ports;
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[0].node_port, Some(32510));
        assert_eq!(
            ports[0].target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080))
        );
    }

    fn cluster_ip(service: &StoredService) -> Option<String> {
        Some(service.spec.as_ref()?.cluster_ip.as_ref()?.to_string())
    }

    #[test]
    fn multi_document_yaml_with_comments_and_empty_documents() {
        let text = format!(
            "# leading comment\n---\n{SERVICE_A}\n---   # trailing comment\n\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: a-1, namespace: web, labels: {{kubernetes.io/service-name: a}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [10.244.1.5]}}]\n\
             ---\napiVersion: v1\nkind: Node\nmetadata: {{name: node-1}}\n"
        );
        let (store, invalid) = read(&text);
        assert!(invalid.is_empty(), "{invalid:?}");
        assert_eq!(keys::<Service>(&store), ["web/a"]);
        assert_eq!(keys::<EndpointSlice>(&store), ["web/a-1"]);
        assert_eq!(keys::<Node>(&store), ["node-1"]);
    }

    #[test]
    fn a_broken_document_is_reported_and_the_rest_loads() {
        let text = format!(
            "{SERVICE_A}---\napiVersion: v1\nkind: Service\nmetadata: {{name: b\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: c}}\nspec: {{ports: [{{port: eighty}}]}}\n\
             ---\n{}",
            SERVICE_A.replace("name: a", "name: d")
        );
        let (store, invalid) = read(&text);
        assert_eq!(keys::<Service>(&store), ["web/a", "web/d"]);
        assert_eq!(invalid.len(), 2, "{invalid:?}");
        assert_eq!(invalid[0].reason, reason::PARSE_ERROR);
        assert_eq!(invalid[0].kind, "Document");
        assert!(
            invalid[0]
                .detail
                .starts_with("test.yaml document 2 (line 7)"),
            "{}",
            invalid[0].detail
        );
        assert_eq!(invalid[1].reason, reason::PARSE_ERROR);
        assert_eq!(
            (invalid[1].kind, invalid[1].name.as_str()),
            ("Service", "c")
        );
        assert!(invalid[1].detail.starts_with("test.yaml document 3"));
    }

    #[test]
    fn lists_contribute_their_items() {
        let text = "
apiVersion: v1
kind: List
items:
  - {apiVersion: v1, kind: Service, metadata: {name: a}, spec: {clusterIP: 10.96.0.1}}
  - {apiVersion: apps/v1, kind: Deployment, metadata: {name: a}}
  - apiVersion: v1
    kind: ServiceList
    items:
      - {apiVersion: v1, kind: Service, metadata: {name: b, namespace: x}}
  - {apiVersion: v1, kind: Service, metadata: {name: c}, spec: {ports: 7}}
";
        let (store, invalid) = read(text);
        assert_eq!(keys::<Service>(&store), ["default/a", "x/b"]);
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert_eq!(invalid[0].name, "c");
        assert!(
            invalid[0]
                .detail
                .starts_with("test.yaml document 1 (line 2) item 4"),
            "{}",
            invalid[0].detail
        );
    }

    #[test]
    fn json_streams_and_json_lists() {
        let text = r#"
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}
{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}
]}
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": 5}}
"#;
        let (store, invalid) = read(text);
        assert_eq!(keys::<Service>(&store), ["default/a"]);
        assert_eq!(keys::<Node>(&store), ["node-1"]);
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert!(
            invalid[0]
                .detail
                .starts_with("test.yaml document 3 (line 6)"),
            "{}",
            invalid[0].detail
        );
    }

    #[test]
    fn objects_that_are_not_kubernetes_objects_or_have_no_name() {
        let text = "
just a string
---
{apiVersion: v1, metadata: {name: x}}
---
{apiVersion: v1, kind: Service, metadata: {namespace: web}}
---
{apiVersion: discovery.k8s.io/v1beta1, kind: EndpointSlice, metadata: {name: s}, addressType: IPv4}
---
{apiVersion: v1, kind: ConfigMap, metadata: {name: ignored}}
";
        let (store, invalid) = read(text);
        assert_eq!(store, Store::new());
        let reasons: Vec<_> = invalid.iter().map(|i| (i.kind, i.reason)).collect();
        assert_eq!(
            reasons,
            [
                ("Document", reason::PARSE_ERROR),
                ("Document", reason::PARSE_ERROR),
                ("Service", reason::MISSING_NAME),
                ("EndpointSlice", reason::UNSUPPORTED_API_VERSION),
            ]
        );
    }

    #[test]
    fn a_later_definition_of_the_same_object_wins() {
        let text = format!(
            "{SERVICE_A}---{}",
            SERVICE_A.replace("10.96.0.1", "10.96.0.2")
        );
        let (store, invalid) = read(&text);
        assert!(invalid.is_empty());
        let svc = store
            .get::<Service>(&ObjectKey::new("web", "a"))
            .expect("stored");
        assert_eq!(cluster_ip(svc).as_deref(), Some("10.96.0.2"));
    }

    #[test]
    fn a_directory_is_read_in_name_order_without_other_files() {
        let dir = std::env::temp_dir().join(format!("xlb-manifests-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).expect("temp dir");
        let write = |name: &str, text: &str| fs::write(dir.join(name), text).expect("write");
        write("b.yml", &SERVICE_A.replace("10.96.0.1", "10.96.0.2"));
        write("a.yaml", SERVICE_A);
        write(
            "c.json",
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}"#,
        );
        write(
            "d.txt",
            "apiVersion: v1\nkind: Node\nmetadata: {name: txt}\n",
        );
        write(
            ".e.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: hidden}\n",
        );
        write(
            "sub/f.yaml",
            "apiVersion: v1\nkind: Node\nmetadata: {name: deep}\n",
        );
        write("g.yaml", "\u{0}\u{1}: [");

        let loaded = load(&dir);
        let _ = fs::remove_dir_all(&dir);
        let (store, invalid) = loaded.expect("directory is readable");
        // b.yml comes after a.yaml and wins.
        let svc = store
            .get::<Service>(&ObjectKey::new("web", "a"))
            .expect("stored");
        assert_eq!(cluster_ip(svc).as_deref(), Some("10.96.0.2"));
        assert_eq!(keys::<Node>(&store), ["n"]);
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert!(invalid[0].detail.contains("g.yaml document 1"));
    }

    #[test]
    fn a_missing_path_is_an_error() {
        let err = load(Path::new("/nonexistent/xlb/manifests")).expect_err("missing");
        assert!(matches!(err, ManifestError::Io { .. }));
    }

    /// Waits (bounded) until the store satisfies `check`, waking on every store change.
    async fn wait_for(
        store: &SharedStore,
        changes: &mut tokio::sync::watch::Receiver<u64>,
        what: &str,
        check: impl Fn(&Store) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !store.read(|s, _| check(s)) {
            tokio::time::timeout_at(deadline, changes.changed())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("the store outlives the test");
        }
    }

    fn cluster_ip_of_a(store: &Store) -> Option<String> {
        store
            .get::<Service>(&ObjectKey::new("web", "a"))
            .and_then(cluster_ip)
    }

    #[tokio::test]
    async fn watch_reloads_when_the_files_change() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("a.yaml");
        fs::write(&file, SERVICE_A).expect("write");
        let store = Arc::new(SharedStore::new());
        let mut changes = store.subscribe();
        let interval = Duration::from_millis(20);
        let task = tokio::spawn(watch(dir.path().to_owned(), Arc::clone(&store), interval));

        wait_for(&store, &mut changes, "the first load", |s| {
            cluster_ip_of_a(s).as_deref() == Some("10.96.0.1")
        })
        .await;
        assert!(store.is_synced());

        // Same size, new content, maybe within the same mtime tick: the racy re-read tells.
        fs::write(&file, SERVICE_A.replace("10.96.0.1", "10.96.0.2")).expect("write");
        wait_for(&store, &mut changes, "the edit", |s| {
            cluster_ip_of_a(s).as_deref() == Some("10.96.0.2")
        })
        .await;

        // A new file in the directory.
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\n";
        fs::write(dir.path().join("b.yaml"), node).expect("write");
        wait_for(&store, &mut changes, "the new file", |s| {
            s.node("node-1").is_some()
        })
        .await;

        // Nothing changes: no reload.
        let generation = store.generation();
        tokio::time::sleep(interval * 5).await;
        assert_eq!(store.generation(), generation, "reloaded without a change");

        // The path vanishes: the store keeps the last picture.
        let moved = dir.path().with_extension("moved");
        fs::rename(dir.path(), &moved).expect("rename");
        tokio::time::sleep(interval * 5).await;
        assert_eq!(store.generation(), generation);
        assert!(store.read(|s, _| s.node("node-1").is_some()));

        // It comes back: read again.
        fs::rename(&moved, dir.path()).expect("rename back");
        fs::remove_file(dir.path().join("b.yaml")).expect("remove");
        wait_for(&store, &mut changes, "the path to come back", |s| {
            s.node("node-1").is_none() && cluster_ip_of_a(s).is_some()
        })
        .await;
        task.abort();
    }

    #[test]
    fn yaml_splitting() {
        let docs = yaml_documents("a: 1\n---\n# only a comment\n--- # c\n\nb: 2\n---x: 3\n");
        assert_eq!(docs, [(1, "a: 1\n"), (6, "\nb: 2\n---x: 3\n")]);
        assert_eq!(line_at("{}\n\n  {}", 2), 3);
    }
}
