//! The agent's picture of the cluster: the Services, EndpointSlices (discovery.k8s.io/v1) and
//! Nodes that a source (the API watcher or the manifest reader) delivered, keyed by namespace and
//! name, each kept in its compact form ([`compact`]: the fields the model reads). It only
//! stores; every Kubernetes meaning is given to the objects by `model`. It also remembers which
//! keys changed since [`Store::take_changes`] was last called, so a consumer that keeps results
//! per object (the model's incremental [`Translator`](crate::control::model::Translator)) recomputes only
//! those; an object replaced by an equal one is no change.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use k8s_openapi::{
    ClusterResourceScope, Metadata, NamespaceResourceScope, Resource, ResourceScope,
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub mod compact;

pub use compact::{StoredEndpointSlice, StoredNode, StoredService};

/// The namespace a namespaced object without `metadata.namespace` lands in, as with `kubectl
/// apply` in the default context. Watched objects always carry their namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} without metadata.name")]
    MissingName { kind: &'static str },
}

/// Identity of a stored object: namespace ("" for cluster-scoped kinds such as Node) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    #[must_use]
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of a cluster-scoped object.
    #[must_use]
    pub fn cluster(name: impl Into<String>) -> Self {
        Self::new("", name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Whether a kind lives in a namespace; derived from k8s-openapi's scope marker types.
pub trait Scoped: ResourceScope {
    const NAMESPACED: bool;
}

impl Scoped for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl Scoped for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// A kind the store holds. Implemented for `Service`, `EndpointSlice` and `Node`.
pub trait StoredKind:
    Resource<Scope: Scoped> + Metadata<Ty = ObjectMeta> + Sized + 'static
{
    /// What the store keeps of an object of this kind.
    type Stored: From<Self> + Clone + fmt::Debug + PartialEq + Send + 'static;

    #[doc(hidden)]
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, Self::Stored>;
    #[doc(hidden)]
    fn objects_mut(
        store: &mut Store,
    ) -> (
        &mut BTreeMap<ObjectKey, Self::Stored>,
        &mut BTreeSet<ObjectKey>,
    );

    /// The key this object is stored under.
    fn key(&self) -> Result<ObjectKey, StoreError> {
        ObjectKey::of::<Self>(self.metadata())
    }
}

impl ObjectKey {
    /// The key an object of kind `K` with this metadata is stored under (also for an object
    /// whose body could not be read, so that its key is known all the same).
    pub fn of<K: StoredKind>(meta: &ObjectMeta) -> Result<Self, StoreError> {
        let name = match meta.name.as_deref() {
            Some(name) if !name.is_empty() => name,
            _ => return Err(StoreError::MissingName { kind: K::KIND }),
        };
        let namespace = if <K::Scope as Scoped>::NAMESPACED {
            meta.namespace
                .as_deref()
                .filter(|ns| !ns.is_empty())
                .unwrap_or(DEFAULT_NAMESPACE)
        } else {
            ""
        };
        Ok(Self::new(namespace, name))
    }
}

impl StoredKind for Service {
    type Stored = StoredService;
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, StoredService> {
        &store.services
    }
    fn objects_mut(
        store: &mut Store,
    ) -> (
        &mut BTreeMap<ObjectKey, StoredService>,
        &mut BTreeSet<ObjectKey>,
    ) {
        (&mut store.services, &mut store.changes.services)
    }
}

impl StoredKind for EndpointSlice {
    type Stored = StoredEndpointSlice;
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, StoredEndpointSlice> {
        &store.endpoint_slices
    }
    fn objects_mut(
        store: &mut Store,
    ) -> (
        &mut BTreeMap<ObjectKey, StoredEndpointSlice>,
        &mut BTreeSet<ObjectKey>,
    ) {
        (
            &mut store.endpoint_slices,
            &mut store.changes.endpoint_slices,
        )
    }
}

impl StoredKind for Node {
    type Stored = StoredNode;
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, StoredNode> {
        &store.nodes
    }
    fn objects_mut(
        store: &mut Store,
    ) -> (
        &mut BTreeMap<ObjectKey, StoredNode>,
        &mut BTreeSet<ObjectKey>,
    ) {
        (&mut store.nodes, &mut store.changes.nodes)
    }
}

/// The keys of the objects added, changed or removed since the last [`Store::take_changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub services: BTreeSet<ObjectKey>,
    pub endpoint_slices: BTreeSet<ObjectKey>,
    pub nodes: BTreeSet<ObjectKey>,
}

impl Changes {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.endpoint_slices.is_empty() && self.nodes.is_empty()
    }

    /// Adds the changes of `other` (taken later) to these.
    pub fn merge(&mut self, other: Changes) {
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.nodes.extend(other.nodes);
    }
}

/// Services, EndpointSlices and Nodes by key, iterated in key order. Two stores are equal when
/// they hold the same objects, whatever changes they recorded.
#[derive(Clone, Debug, Default)]
pub struct Store {
    services: BTreeMap<ObjectKey, StoredService>,
    endpoint_slices: BTreeMap<ObjectKey, StoredEndpointSlice>,
    nodes: BTreeMap<ObjectKey, StoredNode>,
    changes: Changes,
}

impl PartialEq for Store {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.endpoint_slices == other.endpoint_slices
            && self.nodes == other.nodes
    }
}

impl Store {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an object (a watch `Apply` event, or one object of a manifest), in its
    /// compact form. Returns what it replaced.
    pub fn apply<K: StoredKind>(&mut self, object: K) -> Result<Option<K::Stored>, StoreError> {
        let key = object.key()?;
        Ok(self.insert::<K>(key, object.into()))
    }

    /// Adds or replaces an object already in its compact form. Returns what it replaced.
    pub fn insert<K: StoredKind>(
        &mut self,
        key: ObjectKey,
        object: K::Stored,
    ) -> Option<K::Stored> {
        let (objects, changed) = K::objects_mut(self);
        match objects.get_mut(&key) {
            Some(current) if *current == object => Some(object),
            Some(current) => {
                changed.insert(key);
                Some(std::mem::replace(current, object))
            }
            None => {
                changed.insert(key.clone());
                objects.insert(key, object);
                None
            }
        }
    }

    /// Removes an object (a watch `Delete` event). Returns it if it was there.
    pub fn delete<K: StoredKind>(&mut self, key: &ObjectKey) -> Option<K::Stored> {
        let (objects, changed) = K::objects_mut(self);
        let removed = objects.remove(key);
        if removed.is_some() {
            changed.insert(key.clone());
        }
        removed
    }

    /// Replaces every object of kind `K` with `objects` (a watcher re-list). On error the store is
    /// left unchanged.
    pub fn replace_all<K: StoredKind>(
        &mut self,
        objects: impl IntoIterator<Item = K>,
    ) -> Result<(), StoreError> {
        let mut fresh = BTreeMap::new();
        for object in objects {
            fresh.insert(object.key()?, object.into());
        }
        self.replace_kind::<K>(fresh);
        Ok(())
    }

    /// Replaces every object of kind `K` with `fresh`, already keyed and compact.
    pub fn replace_kind<K: StoredKind>(&mut self, fresh: BTreeMap<ObjectKey, K::Stored>) {
        let (objects, changed) = K::objects_mut(self);
        let old = std::mem::replace(objects, fresh);
        record_differences(&old, objects, changed);
    }

    /// Replaces the whole content with `fresh`'s (a source that re-reads everything), and
    /// records what differs as changed.
    pub fn assign(&mut self, fresh: Store) {
        let Store {
            services,
            endpoint_slices,
            nodes,
            changes: _,
        } = fresh;
        self.replace_kind::<Service>(services);
        self.replace_kind::<EndpointSlice>(endpoint_slices);
        self.replace_kind::<Node>(nodes);
    }

    /// The keys changed since the previous call (or since the store was made).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// One object by key.
    #[must_use]
    pub fn get<K: StoredKind>(&self, key: &ObjectKey) -> Option<&K::Stored> {
        K::objects(self).get(key)
    }

    /// Every object of kind `K`, in key order.
    pub fn iter<K: StoredKind>(&self) -> impl Iterator<Item = (&ObjectKey, &K::Stored)> {
        K::objects(self).iter()
    }

    /// Number of objects of kind `K`.
    #[must_use]
    pub fn count<K: StoredKind>(&self) -> usize {
        K::objects(self).len()
    }

    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &StoredService)> {
        self.services.iter()
    }

    pub fn endpoint_slices(&self) -> impl Iterator<Item = (&ObjectKey, &StoredEndpointSlice)> {
        self.endpoint_slices.iter()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&ObjectKey, &StoredNode)> {
        self.nodes.iter()
    }

    /// The Service with this key.
    #[must_use]
    pub fn service(&self, key: &ObjectKey) -> Option<&StoredService> {
        self.services.get(key)
    }

    /// The EndpointSlice with this key.
    #[must_use]
    pub fn endpoint_slice(&self, key: &ObjectKey) -> Option<&StoredEndpointSlice> {
        self.endpoint_slices.get(key)
    }

    /// The Node called `name`.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<&StoredNode> {
        self.nodes.get(&ObjectKey::cluster(name))
    }
}

/// Adds to `changed` every key that is in only one of `old` and `new`, or in both with
/// different objects.
fn record_differences<V: PartialEq>(
    old: &BTreeMap<ObjectKey, V>,
    new: &BTreeMap<ObjectKey, V>,
    changed: &mut BTreeSet<ObjectKey>,
) {
    for (key, object) in old {
        if new.get(key) != Some(object) {
            changed.insert(key.clone());
        }
    }
    for key in new.keys() {
        if !old.contains_key(key) {
            changed.insert(key.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: Option<&str>, name: &str, cluster_ip: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: namespace.map(str::to_owned),
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                cluster_ip: Some(cluster_ip.to_owned()),
                ..Default::default()
            }),
            ..Service::default()
        }
    }

    fn cluster_ip(store: &Store, key: &ObjectKey) -> Option<String> {
        store
            .get::<Service>(key)
            .and_then(|s| Some(s.spec.as_ref()?.cluster_ip.as_ref()?.to_string()))
    }

    #[test]
    fn apply_replaces_and_delete_removes() {
        let mut store = Store::new();
        let key = ObjectKey::new("web", "a");
        assert!(
            store
                .apply(service(Some("web"), "a", "10.96.0.1"))
                .expect("named")
                .is_none()
        );
        let old = store
            .apply(service(Some("web"), "a", "10.96.0.2"))
            .expect("named");
        assert_eq!(
            old.and_then(|s| s.spec?.cluster_ip),
            Some(compact::IpText::V4([10, 96, 0, 1].into()))
        );
        assert_eq!(cluster_ip(&store, &key).as_deref(), Some("10.96.0.2"));
        assert_eq!(store.count::<Service>(), 1);
        assert!(store.delete::<Service>(&key).is_some());
        assert!(store.delete::<Service>(&key).is_none());
        assert_eq!(store.count::<Service>(), 0);
    }

    #[test]
    fn namespace_defaults_and_nodes_are_cluster_scoped() {
        let mut store = Store::new();
        store.apply(service(None, "a", "10.96.0.1")).expect("named");
        assert!(
            store
                .get::<Service>(&ObjectKey::new(DEFAULT_NAMESPACE, "a"))
                .is_some()
        );
        let node = Node {
            metadata: ObjectMeta {
                name: Some("node-1".to_owned()),
                namespace: Some("ignored".to_owned()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        store.apply(node).expect("named");
        assert!(store.node("node-1").is_some());
        assert_eq!(
            store
                .nodes()
                .map(|(k, _)| k.to_string())
                .collect::<Vec<_>>(),
            ["node-1"]
        );
    }

    #[test]
    fn missing_name_is_an_error() {
        let mut store = Store::new();
        let mut svc = service(Some("web"), "x", "10.96.0.1");
        svc.metadata.name = None;
        assert!(matches!(
            store.apply(svc),
            Err(StoreError::MissingName { kind: "Service" })
        ));
    }

    #[test]
    fn replace_all_swaps_one_kind_only() {
        let mut store = Store::new();
        store
            .apply(service(Some("web"), "a", "10.96.0.1"))
            .expect("named");
        store
            .apply(service(Some("web"), "b", "10.96.0.2"))
            .expect("named");
        store
            .apply(Node {
                metadata: ObjectMeta {
                    name: Some("node-1".to_owned()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            })
            .expect("named");
        store
            .replace_all([service(Some("web"), "c", "10.96.0.3")])
            .expect("named");
        let keys: Vec<String> = store.services().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, ["web/c"]);
        assert_eq!(store.count::<Node>(), 1);

        // A bad object leaves the store as it was.
        let mut nameless = service(Some("web"), "d", "10.96.0.4");
        nameless.metadata.name = None;
        assert!(
            store
                .replace_all([service(Some("web"), "e", "10.96.0.5"), nameless])
                .is_err()
        );
        let keys: Vec<String> = store.services().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, ["web/c"]);
    }

    fn keys(set: &BTreeSet<ObjectKey>) -> Vec<String> {
        set.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn changes_name_every_key_whose_object_differs() {
        let mut store = Store::new();
        store
            .apply(service(Some("web"), "a", "10.96.0.1"))
            .expect("named");
        store
            .apply(service(Some("web"), "b", "10.96.0.2"))
            .expect("named");
        let changes = store.take_changes();
        assert_eq!(keys(&changes.services), ["web/a", "web/b"]);
        assert!(store.take_changes().is_empty(), "taken");

        // The same object again is no change; a field the store does not keep is none either.
        let mut same = service(Some("web"), "a", "10.96.0.1");
        same.metadata.resource_version = Some("42".to_owned());
        store.apply(same).expect("named");
        assert!(store.take_changes().is_empty());

        store
            .apply(service(Some("web"), "a", "10.96.0.9"))
            .expect("named");
        assert!(
            store
                .delete::<Service>(&ObjectKey::new("web", "b"))
                .is_some()
        );
        assert!(
            store
                .delete::<Service>(&ObjectKey::new("web", "zz"))
                .is_none()
        );
        assert_eq!(keys(&store.take_changes().services), ["web/a", "web/b"]);

        // A re-list records removed, added and changed objects, not unchanged ones.
        store
            .apply(service(Some("web"), "c", "10.96.0.3"))
            .expect("named");
        store.take_changes();
        store
            .replace_all([
                service(Some("web"), "a", "10.96.0.9"),
                service(Some("web"), "c", "10.96.0.4"),
                service(Some("web"), "d", "10.96.0.5"),
            ])
            .expect("named");
        assert_eq!(keys(&store.take_changes().services), ["web/c", "web/d"]);

        // So does replacing the whole store; equality ignores the recorded changes.
        let mut fresh = Store::new();
        fresh
            .apply(service(Some("web"), "a", "10.96.0.9"))
            .expect("named");
        fresh
            .apply(Node {
                metadata: ObjectMeta {
                    name: Some("node-1".to_owned()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            })
            .expect("named");
        store.assign(fresh.clone());
        let changes = store.take_changes();
        assert_eq!(keys(&changes.services), ["web/c", "web/d"]);
        assert_eq!(keys(&changes.nodes), ["node-1"]);
        assert_eq!(store, fresh);
    }

    #[test]
    fn the_compact_form_keeps_what_the_model_reads_as_it_came() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "labels": {
                "kubernetes.io/service-name": "web", "app": "web",
                "service.kubernetes.io/headless": "",
            }},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 70000, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5", "10.244.1.6"], "nodeName": "node-1"},
                {"addresses": ["10.244.1.300"], "nodeName": "node-1",
                 "conditions": {"ready": false, "terminating": true}},
                {"addresses": [], "nodeName": "node-2", "zone": "a"},
            ],
        }))
        .expect("an EndpointSlice");
        let stored = StoredEndpointSlice::from(slice);
        assert_eq!(stored.labels.service_name.as_deref(), Some("web"));
        assert!(stored.labels.headless);
        assert_eq!(stored.labels.service_proxy_name, None);
        assert_eq!(stored.address_type, "IPv4");
        assert_eq!(stored.ports.len(), 1);
        assert_eq!(stored.ports[0].port, Some(70000));
        assert_eq!(stored.ports[0].name.as_deref(), Some("http"));
        let e = &stored.endpoints;
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0].address,
            Some(compact::IpText::V4([10, 244, 1, 5].into()))
        );
        assert_eq!(
            e[1].address,
            Some(compact::IpText::Other("10.244.1.300".into()))
        );
        assert_eq!(e[2].address, None);
        assert_eq!(
            (e[1].ready, e[1].serving, e[1].terminating),
            (Some(false), None, Some(true))
        );
        // One string per node, shared by that node's endpoints.
        let (a, b) = (
            e[0].node_name.as_ref().expect("node"),
            e[1].node_name.as_ref().expect("node"),
        );
        assert!(std::sync::Arc::ptr_eq(a, b));
        assert_eq!(e[2].node_name.as_deref(), Some("node-2"));
    }
}
