//! xlb's agent and CLI: loads the eBPF datapath, attaches it, programs its maps, and reads
//! them back for inspection.
pub mod agent;
pub mod flows;
pub mod http;
pub mod inspect;
pub mod invalid;
pub mod loader;
pub mod maglev;
pub mod mapmem;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod nattable;
pub mod netlink;
pub mod pin;
pub mod programmer;
pub mod snat;
pub mod sockdiag;
pub mod source;
pub mod state;
pub mod store;
