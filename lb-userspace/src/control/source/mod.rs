//! Where the agent learns the cluster's objects. Both sources fill one
//! [`SharedStore`](shared::SharedStore): `kube` watches the API server, `manifests` reads files
//! as `kubectl apply -f` would and re-reads them when they change.
pub mod kube;
pub mod manifests;
pub mod shared;
