//! The control plane: from the cluster's objects to the maps' desired contents, in the order
//! the README draws it. Sources fill the store; the model turns the store into desired state
//! (Kubernetes semantics; objects it must refuse go to `invalid`); the programmer diffs desired
//! against programmed state into map writes (with Maglev tables). Only the sources do I/O
//! (the API server, manifest files); the store, model, state, Maglev and the programmer's
//! planning are pure, and nothing here touches a BPF map: the programmer hands its writes to
//! [`crate::datapath::maps`].
#[cfg(test)]
mod fuzz;
pub mod invalid;
pub mod maglev;
pub mod model;
pub mod programmer;
pub mod source;
pub mod state;
pub mod store;
