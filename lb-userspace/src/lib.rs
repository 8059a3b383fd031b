//! xlb's agent and CLI, by stage: [`control`] (sources → store → model → programmer),
//! [`datapath`] (loader, maps, pins, the node's kernel), [`ops`] (HTTP, metrics, inspection).
//! [`agent`] is the one place that wires them together; `main.rs` is only the CLI.
pub mod agent;
pub mod control;
pub mod datapath;
pub mod ops;
