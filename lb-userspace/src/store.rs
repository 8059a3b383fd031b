//! The agent's picture of the cluster: the Services, EndpointSlices (discovery.k8s.io/v1) and
//! Nodes that a source (the API watcher or the manifest reader) delivered, keyed by namespace and
//! name. It only stores; every Kubernetes meaning is given to the objects by `model`, which
//! always reads the whole store.
use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    ClusterResourceScope, Metadata, NamespaceResourceScope, Resource, ResourceScope,
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

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
    #[doc(hidden)]
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, Self>;
    #[doc(hidden)]
    fn objects_mut(store: &mut Store) -> &mut BTreeMap<ObjectKey, Self>;

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
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, Self> {
        &store.services
    }
    fn objects_mut(store: &mut Store) -> &mut BTreeMap<ObjectKey, Self> {
        &mut store.services
    }
}

impl StoredKind for EndpointSlice {
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, Self> {
        &store.endpoint_slices
    }
    fn objects_mut(store: &mut Store) -> &mut BTreeMap<ObjectKey, Self> {
        &mut store.endpoint_slices
    }
}

impl StoredKind for Node {
    fn objects(store: &Store) -> &BTreeMap<ObjectKey, Self> {
        &store.nodes
    }
    fn objects_mut(store: &mut Store) -> &mut BTreeMap<ObjectKey, Self> {
        &mut store.nodes
    }
}

/// Services, EndpointSlices and Nodes by key, iterated in key order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Store {
    services: BTreeMap<ObjectKey, Service>,
    endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    nodes: BTreeMap<ObjectKey, Node>,
}

impl Store {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an object (a watch `Apply` event, or one object of a manifest). Returns
    /// the object it replaced.
    pub fn apply<K: StoredKind>(&mut self, object: K) -> Result<Option<K>, StoreError> {
        let key = object.key()?;
        Ok(K::objects_mut(self).insert(key, object))
    }

    /// Removes an object (a watch `Delete` event). Returns it if it was there.
    pub fn delete<K: StoredKind>(&mut self, key: &ObjectKey) -> Option<K> {
        K::objects_mut(self).remove(key)
    }

    /// Replaces every object of kind `K` with `objects` (a watcher re-list). On error the store is
    /// left unchanged.
    pub fn replace_all<K: StoredKind>(
        &mut self,
        objects: impl IntoIterator<Item = K>,
    ) -> Result<(), StoreError> {
        let mut fresh = BTreeMap::new();
        for object in objects {
            fresh.insert(object.key()?, object);
        }
        *K::objects_mut(self) = fresh;
        Ok(())
    }

    /// One object by key.
    #[must_use]
    pub fn get<K: StoredKind>(&self, key: &ObjectKey) -> Option<&K> {
        K::objects(self).get(key)
    }

    /// Every object of kind `K`, in key order.
    pub fn iter<K: StoredKind>(&self) -> impl Iterator<Item = (&ObjectKey, &K)> {
        K::objects(self).iter()
    }

    /// Number of objects of kind `K`.
    #[must_use]
    pub fn count<K: StoredKind>(&self) -> usize {
        K::objects(self).len()
    }

    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Service)> {
        self.services.iter()
    }

    pub fn endpoint_slices(&self) -> impl Iterator<Item = (&ObjectKey, &EndpointSlice)> {
        self.endpoint_slices.iter()
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&ObjectKey, &Node)> {
        self.nodes.iter()
    }

    /// The Node called `name`.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(&ObjectKey::cluster(name))
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
            .and_then(|s| s.spec.as_ref()?.cluster_ip.clone())
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
            old.and_then(|s| s.spec?.cluster_ip).as_deref(),
            Some("10.96.0.1")
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
}
