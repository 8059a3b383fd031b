//! xlb's agent and CLI: loads the eBPF datapath, attaches it, and programs its maps.
pub mod invalid;
pub mod loader;
pub mod model;
pub mod source;
pub mod state;
pub mod store;
