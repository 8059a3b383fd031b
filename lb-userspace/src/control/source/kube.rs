//! The Kubernetes API source: watches Services and EndpointSlices (discovery.k8s.io/v1) in every
//! namespace and this node's Node, and mirrors them into the [`SharedStore`]. Each kind is one
//! kube-rs `watcher` with the default backoff. A listing (the first one, or a re-list after the
//! watch fell out of the API server's window) is buffered and replaces the whole kind in one
//! store update when it completes, so the store never shows a half-listed picture and nothing
//! is deleted while a re-list runs; between listings, watch events apply object by object.
//! Watch failures are logged and retried, never fatal. An object that does not deserialize is
//! recorded as [`Invalid`] and treated as absent, and the watch goes on. The source uses only the
//! list and watch verbs.
use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    pin::pin,
    sync::Arc,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource as _,
    config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};

use crate::control::{
    invalid::{Invalid, reason},
    source::shared::SharedStore,
    store::{ObjectKey, StoredKind},
};

/// Readiness name of the Services watch.
pub const SOURCE_SERVICES: &str = "kube/services";
/// Readiness name of the EndpointSlices watch.
pub const SOURCE_ENDPOINT_SLICES: &str = "kube/endpointslices";
/// Readiness name of the watch of this node's Node.
pub const SOURCE_NODE: &str = "kube/node";

/// Errors of the Kubernetes source. Watch failures are not among them: they are retried.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("loading the in-cluster configuration (service account token and CA)")]
    InCluster(#[source] InClusterError),
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("the {watch} watch ended")]
    WatchEnded { watch: &'static str },
}

/// A client for the in-cluster API server (service account), or for the current context of
/// `kubeconfig` when given.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        None => Config::incluster().map_err(KubeSourceError::InCluster)?,
        Some(path) => {
            let error = |source| KubeSourceError::Kubeconfig {
                path: path.to_owned(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(error)?
        }
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Mirrors Services, EndpointSlices and the Node called `node_name` into `store` until a watch
/// ends, which kube's watcher never does by itself: every failure is retried with backoff.
/// Registers the three watches with the store first, so readiness waits for all of them.
pub async fn run(
    client: Client,
    node_name: String,
    store: Arc<SharedStore>,
) -> Result<(), KubeSourceError> {
    for source in [SOURCE_SERVICES, SOURCE_ENDPOINT_SLICES, SOURCE_NODE] {
        store.register(source);
    }
    let this_node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    tokio::try_join!(
        mirror::<Service>(
            Api::all(client.clone()),
            watcher::Config::default(),
            SOURCE_SERVICES,
            &store,
        ),
        mirror::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default(),
            SOURCE_ENDPOINT_SLICES,
            &store,
        ),
        mirror::<Node>(Api::all(client), this_node, SOURCE_NODE, &store),
    )?;
    Ok(())
}

/// Runs one kind's watcher into the store.
async fn mirror<K>(
    api: Api<Lenient<K>>,
    config: watcher::Config,
    source: &'static str,
    store: &SharedStore,
) -> Result<(), KubeSourceError>
where
    K: StoredKind + DeserializeOwned + Clone + std::fmt::Debug + Send,
{
    let mut mirror = Mirror::<K>::new(source);
    let mut events = pin!(watcher(api, config).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => mirror.handle(event, store),
            // The API server's way of saying "too old resource version": the watcher re-lists.
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                tracing::info!(
                    source,
                    message = status.message,
                    "watch expired; re-listing"
                );
            }
            Err(error) => {
                tracing::warn!(source, error = %error, "watch failed; retrying with backoff");
            }
        }
    }
    Err(KubeSourceError::WatchEnded { watch: source })
}

/// One kind's watch state: the listing being buffered, and whether one completed yet.
struct Mirror<K> {
    source: &'static str,
    /// The objects of the listing in progress; `None` between listings.
    listing: Option<Vec<Lenient<K>>>,
    synced: bool,
}

impl<K: StoredKind> Mirror<K> {
    fn new(source: &'static str) -> Self {
        Self {
            source,
            listing: None,
            synced: false,
        }
    }

    fn handle(&mut self, event: watcher::Event<Lenient<K>>, store: &SharedStore) {
        match event {
            watcher::Event::Init => {
                if self.listing.is_some() {
                    tracing::debug!(source = self.source, "listing restarted");
                }
                self.listing = Some(Vec::new());
            }
            watcher::Event::InitApply(object) => {
                self.listing.get_or_insert_with(Vec::new).push(object);
            }
            watcher::Event::InitDone => self.listed(store),
            watcher::Event::Apply(object) => self.apply(object, store),
            watcher::Event::Delete(object) => self.delete(&object, store),
        }
    }

    /// A listing completed: it becomes the whole picture of the kind, in one update.
    fn listed(&mut self, store: &SharedStore) {
        let listing = self.listing.take().unwrap_or_default();
        let mut objects = Vec::with_capacity(listing.len());
        let mut refused = Vec::new();
        for object in listing {
            match object.into_readable(self.source) {
                Ok((_, object)) => objects.push(object),
                Err(invalid) => refused.push(invalid),
            }
        }
        let count = objects.len();
        let result = store.update_source(self.source, |store, invalid| {
            *invalid = refused;
            store.replace_all(objects)
        });
        match result {
            Ok(()) => tracing::debug!(source = self.source, count, "listed"),
            // Unreachable: every object was keyed above.
            Err(error) => tracing::error!(source = self.source, %error, "listing not stored"),
        }
        if !self.synced {
            self.synced = true;
            store.set_synced(self.source);
            tracing::info!(source = self.source, count, "first listing complete");
        }
    }

    fn apply(&self, object: Lenient<K>, store: &SharedStore) {
        store.update_source(self.source, |store, invalid| {
            match object.into_readable(self.source) {
                Ok((key, object)) => {
                    forget(invalid, &key);
                    if let Err(error) = store.apply(object) {
                        tracing::error!(source = self.source, %error, "object not stored");
                    }
                }
                Err(refused) => {
                    // What xlb cannot read it does not program (the model refuses whole
                    // objects too), so the last readable version goes.
                    let key = ObjectKey::new(refused.namespace.clone(), refused.name.clone());
                    store.delete::<K>(&key);
                    forget(invalid, &key);
                    invalid.push(refused);
                }
            }
        });
    }

    fn delete(&self, object: &Lenient<K>, store: &SharedStore) {
        let key = match ObjectKey::of::<K>(object.meta()) {
            Ok(key) => key,
            Err(error) => {
                tracing::warn!(source = self.source, %error, "delete event ignored");
                return;
            }
        };
        store.update_source(self.source, |store, invalid| {
            store.delete::<K>(&key);
            forget(invalid, &key);
        });
    }
}

/// Test access to the watch path: `objects` (JSON as the API server sends them) go through the
/// same lenient decoding and [`Mirror`] a watch uses, as one listing or as one watch event each.
#[cfg(test)]
pub(crate) mod replay {
    use super::{Lenient, Mirror, SharedStore, StoredKind, watcher};

    /// A full listing of `objects` (`Init`, `InitApply` each, `InitDone`), as after a relist.
    pub(crate) fn listing<K: StoredKind + serde::de::DeserializeOwned>(
        source: &'static str,
        store: &SharedStore,
        objects: &[serde_json::Value],
    ) {
        let mut mirror = Mirror::<K>::new(source);
        mirror.handle(watcher::Event::Init, store);
        for object in objects {
            mirror.handle(watcher::Event::InitApply(decode(object)), store);
        }
        mirror.handle(watcher::Event::InitDone, store);
    }

    /// One watch event applying `object`.
    pub(crate) fn apply<K: StoredKind + serde::de::DeserializeOwned>(
        source: &'static str,
        store: &SharedStore,
        object: &serde_json::Value,
    ) {
        Mirror::<K>::new(source).handle(watcher::Event::Apply(decode(object)), store);
    }

    fn decode<K: StoredKind + serde::de::DeserializeOwned>(
        object: &serde_json::Value,
    ) -> Lenient<K> {
        // What the watcher's decoding does with the body of an event.
        let text = object.to_string();
        serde_json::from_str(&text).unwrap_or_else(|error| Lenient::Unreadable {
            meta: Box::default(),
            error: error.to_string(),
        })
    }
}

/// Drops the refusal recorded for `key`, if any.
fn forget(invalid: &mut Vec<Invalid>, key: &ObjectKey) {
    invalid.retain(|i| i.namespace != key.namespace || i.name != key.name);
}

/// An object as the API server sent it: `K` when it deserializes, else its metadata and the
/// reason. kube's typed list would fail whole on one bad item (and retry it forever), so the
/// watcher is given this type, whose deserialization succeeds for any JSON object.
#[derive(Clone, Debug)]
enum Lenient<K> {
    Read(K),
    // Boxed: the rare case should not make every buffered object bigger.
    Unreadable {
        meta: Box<ObjectMeta>,
        error: String,
    },
}

impl<K: StoredKind> Lenient<K> {
    /// The object and its key, or the refusal to record.
    fn into_readable(self, source: &str) -> Result<(ObjectKey, K), Invalid> {
        let refusal = |meta: &ObjectMeta, reason, detail: String| {
            tracing::warn!(
                source,
                kind = K::KIND,
                namespace = meta.namespace.as_deref().unwrap_or_default(),
                name = meta.name.as_deref().unwrap_or_default(),
                reason,
                detail,
                "skipping an object"
            );
            let key = ObjectKey::of::<K>(meta);
            Invalid {
                kind: K::KIND,
                namespace: key
                    .as_ref()
                    .map(|k| k.namespace.clone())
                    .unwrap_or_default(),
                name: key.map(|k| k.name).unwrap_or_default(),
                reason,
                detail,
            }
        };
        match self {
            Self::Read(object) => match object.key() {
                Ok(key) => Ok((key, object)),
                Err(error) => Err(refusal(
                    object.metadata(),
                    reason::MISSING_NAME,
                    error.to_string(),
                )),
            },
            Self::Unreadable { meta, error } => Err(refusal(&meta, reason::PARSE_ERROR, error)),
        }
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(match K::deserialize(&value) {
            Ok(object) => Self::Read(object),
            Err(error) => Self::Unreadable {
                meta: Box::new(readable_metadata(&value)),
                error: error.to_string(),
            },
        })
    }
}

/// The metadata of an object that does not deserialize: all of it when it reads, else its
/// name, namespace and resourceVersion where those are strings. A bad field elsewhere in the
/// metadata (labels of the wrong type, say) must not lose the key: without it the refusal
/// would name nothing and the object's last readable version would stay programmed.
fn readable_metadata(value: &serde_json::Value) -> ObjectMeta {
    let Some(meta) = value.get("metadata") else {
        return ObjectMeta::default();
    };
    ObjectMeta::deserialize(meta).unwrap_or_else(|_| {
        let text = |field: &str| meta.get(field).and_then(|v| v.as_str()).map(str::to_owned);
        ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            ..ObjectMeta::default()
        }
    })
}

impl<K: StoredKind> kube::Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind((): &()) -> Cow<'_, str> {
        K::KIND.into()
    }
    fn group((): &()) -> Cow<'_, str> {
        K::GROUP.into()
    }
    fn version((): &()) -> Cow<'_, str> {
        K::VERSION.into()
    }
    fn api_version((): &()) -> Cow<'_, str> {
        K::API_VERSION.into()
    }
    fn plural((): &()) -> Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Read(object) => object.metadata(),
            Self::Unreadable { meta, .. } => meta,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Read(object) => object.metadata_mut(),
            Self::Unreadable { meta, .. } => meta,
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::Resource as _;
    use serde_json::json;

    use super::*;
    use crate::control::store::Store;

    fn service(name: &str, body: serde_json::Value) -> Lenient<Service> {
        let mut value =
            json!({"metadata": {"namespace": "web", "name": name, "resourceVersion": "1"}});
        if let (Some(object), serde_json::Value::Object(extra)) = (value.as_object_mut(), body) {
            object.extend(extra);
        }
        serde_json::from_value(value).expect("any object deserializes leniently")
    }

    fn names(store: &SharedStore) -> Vec<String> {
        store.read(|s: &Store, _| s.services().map(|(k, _)| k.name.clone()).collect())
    }

    fn invalid_names(store: &SharedStore) -> Vec<String> {
        store.read(|_, invalid| invalid.iter().map(|i| i.name.clone()).collect())
    }

    #[tokio::test]
    async fn a_client_from_a_kubeconfig_uses_rustls() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("kubeconfig");
        let kubeconfig = "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
            clusters: [{name: lab, cluster: {server: 'https://127.0.0.1:6443', \
            insecure-skip-tls-verify: true}}]\n\
            users: [{name: lab, user: {token: t}}]\n\
            contexts: [{name: lab, context: {cluster: lab, user: lab}}]\n";
        std::fs::write(&path, kubeconfig).expect("write");
        // Building the TLS stack needs a crypto provider: ring, the only one compiled in.
        client(Some(&path)).await.expect("a client");

        let missing = client(Some(&dir.path().join("missing"))).await;
        assert!(matches!(missing, Err(KubeSourceError::Kubeconfig { .. })));
    }

    #[test]
    fn lenient_objects_keep_their_metadata() {
        let good = service("a", json!({"spec": {"clusterIP": "10.96.0.1"}}));
        assert!(matches!(good, Lenient::Read(_)));
        let bad = service("b", json!({"spec": {"ports": 7}}));
        assert!(matches!(bad, Lenient::Unreadable { .. }));
        assert_eq!(bad.meta().name.as_deref(), Some("b"));
        assert_eq!(bad.meta().resource_version.as_deref(), Some("1"));
        assert_eq!(Lenient::<Service>::plural(&()), "services");
        assert_eq!(
            Lenient::<EndpointSlice>::api_version(&()),
            "discovery.k8s.io/v1"
        );
    }

    #[test]
    fn a_relist_replaces_the_kind_at_init_done_only() {
        let store = SharedStore::new();
        store.register(SOURCE_SERVICES);
        let mut mirror = Mirror::<Service>::new(SOURCE_SERVICES);
        mirror.handle(watcher::Event::Init, &store);
        mirror.handle(watcher::Event::InitApply(service("a", json!({}))), &store);
        mirror.handle(watcher::Event::InitApply(service("old", json!({}))), &store);
        assert!(names(&store).is_empty(), "nothing before InitDone");
        assert!(!store.is_synced());
        mirror.handle(watcher::Event::InitDone, &store);
        assert_eq!(names(&store), ["a", "old"]);
        assert!(store.is_synced());

        // A re-list: nothing changes until it completes, then the whole kind at once.
        mirror.handle(watcher::Event::Init, &store);
        mirror.handle(watcher::Event::InitApply(service("a", json!({}))), &store);
        mirror.handle(watcher::Event::InitApply(service("new", json!({}))), &store);
        let bad = service("bad", json!({"spec": {"ports": 7}}));
        mirror.handle(watcher::Event::InitApply(bad), &store);
        assert_eq!(names(&store), ["a", "old"]);
        let generation = store.generation();
        mirror.handle(watcher::Event::InitDone, &store);
        assert_eq!(names(&store), ["a", "new"]);
        assert_eq!(invalid_names(&store), ["bad"]);
        assert_eq!(store.generation(), generation + 1, "one update");
    }

    #[test]
    fn watch_events_apply_and_delete_and_track_refusals() {
        let store = SharedStore::new();
        let mut mirror = Mirror::<Service>::new(SOURCE_SERVICES);
        mirror.handle(watcher::Event::Init, &store);
        mirror.handle(watcher::Event::InitDone, &store);
        mirror.handle(watcher::Event::Apply(service("a", json!({}))), &store);
        mirror.handle(watcher::Event::Apply(service("b", json!({}))), &store);
        assert_eq!(names(&store), ["a", "b"]);

        // An unreadable new version removes the object and records why.
        let bad = service("a", json!({"spec": {"ports": 7}}));
        mirror.handle(watcher::Event::Apply(bad), &store);
        assert_eq!(names(&store), ["b"]);
        assert_eq!(invalid_names(&store), ["a"]);
        // A readable one brings it back and clears the record.
        mirror.handle(watcher::Event::Apply(service("a", json!({}))), &store);
        assert_eq!(names(&store), ["a", "b"]);
        assert!(invalid_names(&store).is_empty());

        mirror.handle(watcher::Event::Delete(service("b", json!({}))), &store);
        assert_eq!(names(&store), ["a"]);
        let bad = service("c", json!({"spec": {"ports": 7}}));
        mirror.handle(watcher::Event::Apply(bad.clone()), &store);
        mirror.handle(watcher::Event::Delete(bad), &store);
        assert!(invalid_names(&store).is_empty());
    }

    /// Found by the control-plane fuzzer: labels of the wrong type made the whole metadata
    /// unreadable, so the refusal named nothing and the last readable version stayed.
    #[test]
    fn an_object_with_unreadable_metadata_keeps_its_key() {
        let store = SharedStore::new();
        let mut mirror = Mirror::<Service>::new(SOURCE_SERVICES);
        mirror.handle(watcher::Event::Init, &store);
        mirror.handle(watcher::Event::InitDone, &store);
        mirror.handle(watcher::Event::Apply(service("a", json!({}))), &store);
        let bad: Lenient<Service> = serde_json::from_value(json!({
            "metadata": {"namespace": "web", "name": "a", "labels": []},
        }))
        .expect("any object deserializes leniently");
        assert_eq!(bad.meta().name.as_deref(), Some("a"));
        mirror.handle(watcher::Event::Apply(bad), &store);
        assert!(names(&store).is_empty());
        assert_eq!(invalid_names(&store), ["a"]);
    }
}
