//! What operators see: the agent's HTTP endpoints (metrics, health), its Prometheus metrics,
//! and the inspection CLI's reading of a running datapath's pinned maps and its rendering.
//! Read-only towards the datapath: nothing here writes a map or changes the node.
pub mod http;
pub mod inspect;
pub mod metrics;
