//! The kernel side: loading and attaching the eBPF programs, pinning, writing and reading
//! their maps (typed writers, the flow and SNAT tables through shared mappings), and what the
//! agent asks the node's kernel (interfaces and addresses over rtnetlink, sockets over
//! `sock_diag`, the SNAT port reservation). No Kubernetes semantics here: what to write comes
//! from [`crate::control`].
pub mod flows;
pub mod loader;
pub mod mapmem;
pub mod maps;
pub mod nattable;
pub mod netlink;
pub mod pin;
pub mod snat;
pub mod sockdiag;
