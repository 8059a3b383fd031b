//! Objects the agent refused: one record per skipped object (or skipped part of one), with a
//! short reason fit for a metric label and a detail for humans. Sources and the model produce
//! them; metrics and the CLI report them.
use std::fmt;

/// Reason labels. Kept short and stable: they become metric label values.
pub mod reason {
    /// A document that is not a readable Kubernetes object.
    pub const PARSE_ERROR: &str = "parse_error";
    /// A kind we use, under an apiVersion we do not (e.g. discovery.k8s.io/v1beta1).
    pub const UNSUPPORTED_API_VERSION: &str = "unsupported_api_version";
    /// An object without `metadata.name`.
    pub const MISSING_NAME: &str = "missing_name";
    /// A port number of 0 or above 65535, or an empty named target port.
    pub const BAD_PORT: &str = "bad_port";
    /// A nodePort of 0 or above 65535.
    pub const BAD_NODE_PORT: &str = "bad_node_port";
    /// An address that does not parse.
    pub const BAD_IP: &str = "bad_ip";
    /// An enumerated field (type, traffic policy) with a value Kubernetes does not define.
    pub const BAD_FIELD: &str = "bad_field";
    /// Two ports of one object with the same (port, protocol) or the same name.
    pub const DUPLICATE_PORT: &str = "duplicate_port";
    /// A Service port whose protocol we do not translate (SCTP); only that port is skipped.
    pub const UNSUPPORTED_PROTOCOL: &str = "unsupported_protocol";
    /// An EndpointSlice with more endpoints than the configured maximum.
    pub const TOO_MANY_ENDPOINTS: &str = "too_many_endpoints";
    /// A Service that needs a cluster IP and has none (only manifests can lack one).
    pub const MISSING_CLUSTER_IP: &str = "missing_cluster_ip";
    /// A frontend another Service already claimed; only that frontend is skipped.
    pub const FRONTEND_CONFLICT: &str = "frontend_conflict";
}

/// One refused object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// "Service", "EndpointSlice", "Node", or "Document" when the kind is unknown.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// One of the [`reason`] labels.
    pub reason: &'static str,
    pub detail: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind)?;
        if !self.namespace.is_empty() {
            write!(f, " {}/{}", self.namespace, self.name)?;
        } else if !self.name.is_empty() {
            write!(f, " {}", self.name)?;
        }
        write!(f, ": {}: {}", self.reason, self.detail)
    }
}
