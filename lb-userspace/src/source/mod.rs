//! Where the agent learns the cluster's objects. Each source fills a [`Store`](crate::store::Store);
//! today that is `manifests` (files as `kubectl apply -f` reads them), the API watcher comes next.
pub mod manifests;
pub mod shared;
