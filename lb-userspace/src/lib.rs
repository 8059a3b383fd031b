//! xlb's agent and CLI: loads the eBPF datapath, attaches it, and programs its maps.
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod programmer;
pub mod state;
