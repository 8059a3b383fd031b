//! The Kubernetes semantics of the agent: [`desired`] turns the whole store (Services,
//! EndpointSlices) and this node's identity into the [`DesiredState`] its datapath must hold, the
//! way kube-proxy reads the same objects, and lists the objects it refused. It is pure: no I/O,
//! no clock, the same store always gives the same state.
//!
//! # Semantics
//! - **Which Services.** Type ClusterIP (the default), NodePort and LoadBalancer are programmed.
//!   Headless Services (`clusterIP: None`), `ExternalName` Services and objects labelled
//!   `service.kubernetes.io/headless` are not. Objects labelled
//!   `service.kubernetes.io/service-proxy-name` belong to another proxy unless the label equals
//!   [`ModelOptions::service_proxy_name`]. As in kube-proxy, both label rules filter
//!   EndpointSlices as well as Services. Only IPv4 is programmed: the first IPv4 address of
//!   `spec.clusterIPs` (or `spec.clusterIP`) is the cluster IP; an IPv6-only Service is skipped.
//! - **Frontends.** Each TCP/UDP service port gives `clusterIP:port` (`ClusterIp`); for NodePort
//!   and LoadBalancer Services with a `nodePort`, `nodeAddress:nodePort` for every address of
//!   this node (NodePort); for LoadBalancer Services, `ingressIP:port` for every
//!   `status.loadBalancer.ingress[].ip` whose `ipMode` is absent or `VIP` (`Proxy` means the load
//!   balancer itself proxies, so kube-proxy leaves the address alone); for every IPv4
//!   `spec.externalIPs` entry, `externalIP:port` (`ExternalIp`). Every frontend exists in both
//!   scopes: External (arrived on a NIC) and Internal (sent by a pod of this node).
//! - **Backends per scope** (kube-proxy's cluster/local endpoint sets):
//!   `ClusterIp`, both scopes: all endpoints, or only this node's with
//!   `internalTrafficPolicy: Local`; kube-proxy applies the internal policy to every packet
//!   for the cluster IP, whatever its source. `snat_remote` is set (kube-proxy masquerades
//!   off-cluster sources of cluster-IP traffic).
//!   `NodePort`, `LoadBalancer` and `ExternalIp`, External scope: all endpoints with SNAT to remote
//!   ones (`externalTrafficPolicy: Cluster`), or only this node's endpoints and the client's
//!   address kept (`Local`: `snat_remote` false). Internal scope: all endpoints with
//!   `snat_remote`, whatever the policies: kube-proxy short-circuits pod traffic to external
//!   addresses to the cluster-wide endpoints.
//!   A frontend with no backend is still programmed: the datapath drops its traffic.
//! - **Endpoints.** EndpointSlices join their Service by namespace and the
//!   `kubernetes.io/service-name` label. Only `addressType: IPv4` slices are read: IPv6 slices
//!   are counted in [`Desired::ipv6_slices_ignored`], FQDN slices ignored. A service port takes
//!   from each slice the port entry with the same name and protocol (unnamed = ""), and that
//!   entry's `port` is the backend port: `targetPort` (number or name) is not consulted, the
//!   EndpointSlice controller has already resolved it per pod. The first address of an endpoint
//!   is its address (the API says consumers use only that one). An endpoint is ready when
//!   `conditions.ready` is true or absent; a set (all endpoints, or this node's) uses its ready
//!   endpoints, or if it has none, its serving-and-terminating ones (KEP-1669).
//!   `publishNotReadyAddresses` makes every endpoint ready. An address:port listed in several
//!   slices counts once (a ready copy wins). A backend is `local` when its endpoint's
//!   `nodeName` is this node. Backends are sorted.
//! - **Refused input.** A Service or EndpointSlice with a field Kubernetes validation would
//!   reject (port 0 or above 65535, nodePort 0 or above 65535 — any nodePort in 1..=65535 is
//!   accepted, the 30000-32767 default range is the API server's business — an address that does
//!   not parse, two ports with the same (port, protocol) or name, an unknown type or traffic
//!   policy, more than [`ModelOptions::max_endpoints_per_slice`] endpoints) is skipped whole with
//!   one warning and an [`Invalid`] record; everything else is still programmed. A bad endpoint
//!   address skips its whole slice. A Service port with a protocol other than TCP or UDP (SCTP)
//!   skips only that port. A Service without a cluster IP (only a manifest can lack one; the
//!   API server always allocates it) is refused as `missing_cluster_ip`. When two Services claim
//!   the same frontend, the first in namespace/name order keeps it and the other one's frontend
//!   is dropped and recorded as `frontend_conflict`.
//!
//! Reading and validating the objects (the refusals above) is `parse`'s; this module
//! translates the valid views.
//!
//! Not modelled yet: session affinity, `loadBalancerSourceRanges`, topology-aware routing
//! (hints, `trafficDistribution`), health check node ports.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_map::Entry},
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

pub use crate::control::invalid::{Invalid, reason};
pub use crate::control::store::compact::{
    LABEL_HEADLESS, LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME,
};
use crate::control::{
    state::{
        BackendAddr, BackendSpec, DesiredState, FrontendAddr, FrontendKind, FrontendSpec, Proto,
        Scope, ServicePortRef,
    },
    store::{Changes, ObjectKey, Store, StoredEndpointSlice, StoredNode, StoredService},
};
use parse::{
    Parsed, Refusal, ServiceType, ValidPort, ValidService, ValidSlice, dedup, not_ours,
    parse_service, parse_slice, refuse,
};

/// How `desired` reads the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// Objects labelled `service.kubernetes.io/service-proxy-name` with this value are ours;
    /// objects with any other value belong to another proxy.
    pub service_proxy_name: Option<String>,
    /// Larger EndpointSlices are refused. The default is the API server's own limit (1000), so
    /// only a hand-written manifest can exceed it.
    pub max_endpoints_per_slice: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            service_proxy_name: None,
            max_endpoints_per_slice: 1000,
        }
    }
}

/// The node the state is computed for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node's name, compared with endpoints' `nodeName`.
    pub name: String,
    /// Addresses that NodePorts answer on.
    pub addresses: Vec<Ipv4Addr>,
}

impl NodeInfo {
    /// The node's name and its `InternalIP` and `ExternalIP` IPv4 addresses, in the Node's order,
    /// without duplicates.
    #[must_use]
    pub fn from_node(name: &str, node: &StoredNode) -> Self {
        let mut addresses = Vec::new();
        for (type_, address) in &node.addresses {
            if type_ != "InternalIP" && type_ != "ExternalIP" {
                continue;
            }
            match IpAddr::from_str(address) {
                Ok(IpAddr::V4(ip)) if !addresses.contains(&ip) => addresses.push(ip),
                Ok(_) => {}
                Err(_) => tracing::warn!(
                    node = name,
                    address = &**address,
                    "ignoring a node address that does not parse"
                ),
            }
        }
        Self {
            name: name.to_owned(),
            addresses,
        }
    }

    /// [`NodeInfo::from_node`] of the Node called `name` in `store`.
    #[must_use]
    pub fn from_store(store: &Store, name: &str) -> Option<Self> {
        store.node(name).map(|node| Self::from_node(name, node))
    }
}

/// What `desired` computed: the state to program and what it had to leave out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub state: DesiredState,
    /// Objects (or parts of objects) refused, in the order met.
    pub invalid: Vec<Invalid>,
    /// EndpointSlices of address type IPv6, which this IPv4 datapath does not use.
    pub ipv6_slices_ignored: usize,
}

/// The desired datapath state of `node` for the objects in `store`. See the module doc.
///
/// Services are translated in key order and a frontend goes to the first Service that claims
/// it; [`Translator`] keeps the same result up to date from changes.
#[must_use]
pub fn desired(store: &Store, node: &NodeInfo, opts: &ModelOptions) -> Desired {
    let ctx = Context::new(node, opts);
    let mut out = Desired::default();
    let mut slices: BTreeMap<ObjectKey, Vec<ValidSlice<'_>>> = BTreeMap::new();
    for (key, slice) in store.endpoint_slices() {
        match classify_slice(key, slice, opts) {
            SliceClass::Ignored => {}
            SliceClass::Ipv6 => out.ipv6_slices_ignored += 1,
            SliceClass::Refused(invalid) => out.invalid.push(invalid),
            SliceClass::Valid(service, valid) => slices.entry(service).or_default().push(valid),
        }
    }
    for (key, service) in store.services() {
        let slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
        let translation = translate_service(&ctx, key, service, slices);
        out.invalid.extend(translation.refusals);
        for claim in translation.claims {
            if let Some(owner) = out.state.frontends.get(&claim.at(Scope::External)) {
                out.invalid.push(conflict(&claim, owner));
                continue;
            }
            let (at_external, at_internal) = (claim.at(Scope::External), claim.at(Scope::Internal));
            out.state.frontends.insert(at_external, claim.external);
            out.state.frontends.insert(at_internal, claim.internal);
        }
    }
    out
}

/// [`desired`], kept up to date incrementally. The result of a Service depends only on that
/// Service, its EndpointSlices and the node; so the translator remembers which Service each
/// slice belongs to and which frontends each Service claims, and [`Translator::update`]
/// translates again only the Services whose object or slices changed. Two Services claiming
/// one frontend are resolved as [`desired`] does (the first in namespace/name order keeps it)
/// by translating again every claimant of each frontend whose claims changed. A new node (or
/// the first update) translates everything. After every update, [`Translator::desired`]
/// equals [`desired`] of the same store, node and options.
#[derive(Clone, Debug)]
pub struct Translator {
    opts: ModelOptions,
    /// The node of the cached results; None before the first update.
    node: Option<NodeInfo>,
    /// The Service (key) of every valid IPv4 slice, and what became of the others.
    slices: HashMap<ObjectKey, SliceEntry>,
    /// The valid IPv4 slices of each Service key, sorted.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    refused_slices: BTreeMap<ObjectKey, Invalid>,
    ipv6_slices_ignored: usize,
    /// The frontends each Service claims (External-scope addresses, each once, in claim order).
    claims: HashMap<ObjectKey, Vec<FrontendAddr>>,
    /// The Services claiming each frontend (External-scope address), sorted: the first owns it.
    claimants: HashMap<FrontendAddr, Vec<ObjectKey>>,
    /// Refusals of each Service that has any (its own, then its lost frontends), in key order.
    refused_services: BTreeMap<ObjectKey, Vec<Invalid>>,
    state: DesiredState,
}

#[derive(Clone, Debug)]
enum SliceEntry {
    Ipv6,
    Refused,
    Valid(ObjectKey),
}

impl Translator {
    #[must_use]
    pub fn new(opts: ModelOptions) -> Self {
        Self {
            opts,
            node: None,
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
            refused_slices: BTreeMap::new(),
            ipv6_slices_ignored: 0,
            claims: HashMap::new(),
            claimants: HashMap::new(),
            refused_services: BTreeMap::new(),
            state: DesiredState::default(),
        }
    }

    /// Brings the result up to date with `store`, whose objects changed since the previous
    /// update only where `changes` says (the first update, and any update for another node,
    /// read the whole store). Returns every frontend (both scopes) whose spec differs from the
    /// previous result: added, changed or removed.
    pub fn update(
        &mut self,
        store: &Store,
        node: &NodeInfo,
        changes: &Changes,
    ) -> BTreeSet<FrontendAddr> {
        let opts = self.opts.clone();
        let ctx = Context::new(node, &opts);
        if self.node.as_ref() != Some(node) {
            self.node = Some(node.clone());
            return self.rebuild(&ctx, store);
        }

        let mut dirty: BTreeSet<ObjectKey> = changes.services.clone();
        for key in &changes.endpoint_slices {
            self.update_slice(store, key, &mut dirty);
        }
        let mut fresh: BTreeMap<ObjectKey, Translation> = BTreeMap::new();
        let mut touched: BTreeSet<FrontendAddr> = BTreeSet::new();
        for key in dirty {
            let translation = self.retranslate(&ctx, store, &key, &mut touched);
            fresh.insert(key, translation);
        }
        // Who owns a touched frontend can change for any of its claimants: translate those too
        // (their claims are unchanged; their specs and refusals are needed).
        let others: BTreeSet<ObjectKey> = touched
            .iter()
            .filter_map(|at| self.claimants.get(at))
            .flatten()
            .filter(|k| !fresh.contains_key(*k))
            .cloned()
            .collect();
        for key in others {
            let translation = self.translate(&ctx, store, &key);
            fresh.insert(key, translation);
        }
        let differ = self.resolve(&touched, &fresh);
        self.record_refusals(fresh);
        differ
    }

    /// Translates the Service `key` again and records its claims in place of the old ones;
    /// every frontend it claimed before or claims now is `touched`.
    fn retranslate(
        &mut self,
        ctx: &Context<'_>,
        store: &Store,
        key: &ObjectKey,
        touched: &mut BTreeSet<FrontendAddr>,
    ) -> Translation {
        for at in self.claims.remove(key).unwrap_or_default() {
            if let Some(claimants) = self.claimants.get_mut(&at) {
                claimants.retain(|k| k != key);
                if claimants.is_empty() {
                    self.claimants.remove(&at);
                }
            }
            touched.insert(at);
        }
        let translation = self.translate(ctx, store, key);
        let mut claimed: Vec<FrontendAddr> = Vec::new();
        for claim in &translation.claims {
            let at = claim.at(Scope::External);
            if !claimed.contains(&at) {
                claimed.push(at);
                let claimants = self.claimants.entry(at).or_default();
                if let Err(i) = claimants.binary_search(key) {
                    claimants.insert(i, key.clone());
                }
                touched.insert(at);
            }
        }
        if !claimed.is_empty() {
            self.claims.insert(key.clone(), claimed);
        }
        translation
    }

    /// Gives each touched frontend to its first claimant's first claim of it (`fresh` holds
    /// every claimant's translation). Returns the frontends whose spec changed.
    fn resolve(
        &mut self,
        touched: &BTreeSet<FrontendAddr>,
        fresh: &BTreeMap<ObjectKey, Translation>,
    ) -> BTreeSet<FrontendAddr> {
        let mut differ = BTreeSet::new();
        for at in touched {
            let winner = self.claimants.get(at).and_then(|c| c.first());
            let claim = winner.and_then(|w| {
                fresh
                    .get(w)?
                    .claims
                    .iter()
                    .find(|c| c.at(Scope::External) == *at)
            });
            let specs = claim.map(|c| (c.external.clone(), c.internal.clone()));
            let (external, internal) = specs.unzip();
            for (scope, spec) in [(Scope::External, external), (Scope::Internal, internal)] {
                let at = FrontendAddr { scope, ..*at };
                if self.state.frontends.get(&at) == spec.as_ref() {
                    continue;
                }
                differ.insert(at);
                match spec {
                    Some(spec) => self.state.frontends.insert(at, spec),
                    None => self.state.frontends.remove(&at),
                };
            }
        }
        differ
    }

    /// The refusals of every Service translated: its own, then the frontends it lost.
    fn record_refusals(&mut self, fresh: BTreeMap<ObjectKey, Translation>) {
        for (key, translation) in fresh {
            let mut refusals = translation.refusals;
            let mut seen: Vec<FrontendAddr> = Vec::new();
            for claim in &translation.claims {
                let at = claim.at(Scope::External);
                let first = !seen.contains(&at);
                seen.push(at);
                let owner = self.claimants.get(&at).and_then(|c| c.first());
                if first && owner == Some(&key) {
                    continue;
                }
                if let Some(spec) = self.state.frontends.get(&at) {
                    refusals.push(conflict(claim, spec));
                }
            }
            if refusals.is_empty() {
                self.refused_services.remove(&key);
            } else {
                self.refused_services.insert(key, refusals);
            }
        }
    }

    /// The current result: state, refusals (slices first, then Services, each in key order,
    /// as [`desired`] meets them) and the IPv6 slice count.
    #[must_use]
    pub fn desired(&self) -> Desired {
        Desired {
            state: self.state.clone(),
            invalid: self.invalid(),
            ipv6_slices_ignored: self.ipv6_slices_ignored,
        }
    }

    /// The current desired state.
    #[must_use]
    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// The objects (or parts of objects) currently refused, in [`desired`]'s order.
    #[must_use]
    pub fn invalid(&self) -> Vec<Invalid> {
        self.refused_slices
            .values()
            .chain(self.refused_services.values().flatten())
            .cloned()
            .collect()
    }

    /// EndpointSlices of address type IPv6 in the store.
    #[must_use]
    pub fn ipv6_slices_ignored(&self) -> usize {
        self.ipv6_slices_ignored
    }

    /// Translates the whole store from scratch, the way [`desired`] does, and builds the
    /// indexes that later updates read: the first update, and any update for another node.
    /// Returns the frontends whose spec differs from the previous result.
    fn rebuild(&mut self, ctx: &Context<'_>, store: &Store) -> BTreeSet<FrontendAddr> {
        let before = std::mem::take(&mut self.state);
        self.slices.clear();
        self.slices_by_service.clear();
        self.refused_slices.clear();
        self.ipv6_slices_ignored = 0;
        self.claims.clear();
        self.claimants.clear();
        self.refused_services.clear();

        let mut valid: HashMap<ObjectKey, Vec<ValidSlice<'_>>> = HashMap::new();
        // The store iterates in key order: each Service's slice keys come sorted.
        for (key, slice) in store.endpoint_slices() {
            let entry = match classify_slice(key, slice, ctx.opts) {
                SliceClass::Ignored => continue,
                SliceClass::Ipv6 => {
                    self.ipv6_slices_ignored += 1;
                    SliceEntry::Ipv6
                }
                SliceClass::Refused(invalid) => {
                    self.refused_slices.insert(key.clone(), invalid);
                    SliceEntry::Refused
                }
                SliceClass::Valid(service, slice) => {
                    self.slices_by_service
                        .entry(service.clone())
                        .or_default()
                        .push(key.clone());
                    valid.entry(service.clone()).or_default().push(slice);
                    SliceEntry::Valid(service)
                }
            };
            self.slices.insert(key.clone(), entry);
        }
        // Services in key order, so each frontend's claimants come sorted and the first
        // claimant takes it, as in `desired`.
        for (key, service) in store.services() {
            let slices = valid.get(key).map(Vec::as_slice).unwrap_or_default();
            let translation = translate_service(ctx, key, service, slices);
            let mut refusals = translation.refusals;
            let mut claimed: Vec<FrontendAddr> = Vec::new();
            for claim in translation.claims {
                let at = claim.at(Scope::External);
                if !claimed.contains(&at) {
                    claimed.push(at);
                    self.claimants.entry(at).or_default().push(key.clone());
                }
                if let Some(owner) = self.state.frontends.get(&at) {
                    refusals.push(conflict(&claim, owner));
                    continue;
                }
                let at_internal = claim.at(Scope::Internal);
                self.state.frontends.insert(at, claim.external);
                self.state.frontends.insert(at_internal, claim.internal);
            }
            if !claimed.is_empty() {
                self.claims.insert(key.clone(), claimed);
            }
            if !refusals.is_empty() {
                self.refused_services.insert(key.clone(), refusals);
            }
        }
        differing(&before.frontends, &self.state.frontends)
    }

    /// Re-reads one slice; the Services it belonged to and belongs to now become dirty.
    fn update_slice(&mut self, store: &Store, key: &ObjectKey, dirty: &mut BTreeSet<ObjectKey>) {
        match self.slices.remove(key) {
            Some(SliceEntry::Valid(service)) => {
                if let Some(slices) = self.slices_by_service.get_mut(&service) {
                    slices.retain(|k| k != key);
                    if slices.is_empty() {
                        self.slices_by_service.remove(&service);
                    }
                }
                dirty.insert(service);
            }
            Some(SliceEntry::Ipv6) => self.ipv6_slices_ignored -= 1,
            Some(SliceEntry::Refused) => {
                self.refused_slices.remove(key);
            }
            None => {}
        }
        let Some(slice) = store.endpoint_slice(key) else {
            return;
        };
        let entry = match classify_slice(key, slice, &self.opts) {
            SliceClass::Ignored => return,
            SliceClass::Ipv6 => {
                self.ipv6_slices_ignored += 1;
                SliceEntry::Ipv6
            }
            SliceClass::Refused(invalid) => {
                self.refused_slices.insert(key.clone(), invalid);
                SliceEntry::Refused
            }
            SliceClass::Valid(service, _) => {
                let slices = self.slices_by_service.entry(service.clone()).or_default();
                if let Err(i) = slices.binary_search(key) {
                    slices.insert(i, key.clone());
                }
                dirty.insert(service.clone());
                SliceEntry::Valid(service)
            }
        };
        self.slices.insert(key.clone(), entry);
    }

    /// The translation of the Service `key` as the store holds it now (nothing if it is gone).
    fn translate(&self, ctx: &Context<'_>, store: &Store, key: &ObjectKey) -> Translation {
        let Some(service) = store.service(key) else {
            return Translation::default();
        };
        let slices: Vec<ValidSlice<'_>> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice_key| {
                let slice = store.endpoint_slice(slice_key)?;
                match classify_slice(slice_key, slice, ctx.opts) {
                    SliceClass::Valid(_, valid) => Some(valid),
                    _ => None,
                }
            })
            .collect();
        translate_service(ctx, key, service, &slices)
    }
}

/// The keys whose values differ between two maps (in one only, or in both with other values).
fn differing<K: Ord + Copy, V: PartialEq>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> BTreeSet<K> {
    let mut out = BTreeSet::new();
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((k, _)), None) => {
                out.insert(**k);
                old.next();
            }
            (None, Some((k, _))) => {
                out.insert(**k);
                new.next();
            }
            (Some((ko, vo)), Some((kn, vn))) => match ko.cmp(kn) {
                std::cmp::Ordering::Less => {
                    out.insert(**ko);
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    out.insert(**kn);
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if vo != vn {
                        out.insert(**ko);
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    out
}

/// The node and options a translation is for.
struct Context<'a> {
    node: &'a NodeInfo,
    node_addresses: Vec<Ipv4Addr>,
    opts: &'a ModelOptions,
}

impl<'a> Context<'a> {
    fn new(node: &'a NodeInfo, opts: &'a ModelOptions) -> Self {
        Self {
            node,
            node_addresses: dedup(node.addresses.iter().copied()),
            opts,
        }
    }
}

/// What one Service asks for: the refusals of the Service itself and its frontends in the
/// order it claims them (which decides conflicts within the Service).
#[derive(Default)]
struct Translation {
    refusals: Vec<Invalid>,
    claims: Vec<Claim>,
}

/// One frontend a Service port claims, in both scopes.
struct Claim {
    addr: Ipv4Addr,
    port: u16,
    proto: Proto,
    external: FrontendSpec,
    internal: FrontendSpec,
}

impl Claim {
    fn at(&self, scope: Scope) -> FrontendAddr {
        FrontendAddr {
            addr: self.addr,
            port: self.port,
            proto: self.proto,
            scope,
        }
    }
}

/// The refusal of a frontend that `owner` already has.
fn conflict(claim: &Claim, owner: &FrontendSpec) -> Invalid {
    let detail = format!(
        "{kind:?} frontend {addr}:{port}/{proto} of port '{port_name}' is already \
         {owner_kind:?} of {owner_service}",
        kind = claim.external.kind,
        addr = claim.addr,
        port = claim.port,
        proto = claim.proto,
        port_name = claim.external.service.port_name,
        owner_kind = owner.kind,
        owner_service = owner.service,
    );
    let key = ObjectKey::new(
        &*claim.external.service.namespace,
        &*claim.external.service.name,
    );
    refuse(
        "Service",
        &key,
        Refusal::new(reason::FRONTEND_CONFLICT, detail),
    )
}

/// One endpoint of one service port after merging its slices.
#[derive(Clone, Copy)]
struct Endpoint {
    backend: BackendSpec,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// What an EndpointSlice is to the model.
enum SliceClass<'a> {
    /// Not ours, without a service-name label, or of an address type other than IPv4/IPv6.
    Ignored,
    Ipv6,
    Refused(Invalid),
    /// A valid IPv4 slice of the Service with this key.
    Valid(ObjectKey, ValidSlice<'a>),
}

fn classify_slice<'s>(
    key: &ObjectKey,
    slice: &'s StoredEndpointSlice,
    opts: &ModelOptions,
) -> SliceClass<'s> {
    if let Some(why) = not_ours(&slice.labels, opts) {
        tracing::debug!(slice = %key, why, "ignoring EndpointSlice");
        return SliceClass::Ignored;
    }
    let Some(service) = slice.labels.service_name.as_deref() else {
        tracing::debug!(slice = %key, "ignoring EndpointSlice without a service-name label");
        return SliceClass::Ignored;
    };
    match &*slice.address_type {
        "IPv4" => {}
        "IPv6" => return SliceClass::Ipv6,
        other => {
            tracing::debug!(slice = %key, address_type = other, "ignoring EndpointSlice");
            return SliceClass::Ignored;
        }
    }
    match parse_slice(slice, opts) {
        Ok(valid) => SliceClass::Valid(ObjectKey::new(key.namespace.clone(), service), valid),
        Err(refusal) => SliceClass::Refused(refuse("EndpointSlice", key, refusal)),
    }
}

/// The translation of one Service with its valid slices (in slice key order).
fn translate_service(
    ctx: &Context<'_>,
    key: &ObjectKey,
    service: &StoredService,
    slices: &[ValidSlice<'_>],
) -> Translation {
    let mut out = Translation::default();
    if let Some(why) = not_ours(&service.labels, ctx.opts) {
        tracing::debug!(service = %key, why, "not programming Service");
        return out;
    }
    let valid = match parse_service(key, service) {
        Ok(Parsed::Program(valid, unsupported)) => {
            out.refusals = unsupported
                .into_iter()
                .map(|refusal| refuse("Service", key, refusal))
                .collect();
            valid
        }
        Ok(Parsed::Skip(why)) => {
            tracing::debug!(service = %key, why, "not programming Service");
            return out;
        }
        Err(refusal) => {
            out.refusals.push(refuse("Service", key, refusal));
            return out;
        }
    };
    for port in &valid.ports {
        add_port(ctx, &valid, port, slices, &mut out.claims);
    }
    out
}

/// Every frontend of one service port, in claim order: the cluster IP, then the node ports,
/// external IPs and load balancer IPs.
fn add_port(
    ctx: &Context<'_>,
    service: &ValidService<'_>,
    port: &ValidPort<'_>,
    slices: &[ValidSlice<'_>],
    claims: &mut Vec<Claim>,
) {
    let endpoints = merge_endpoints(slices, port, service.publish_not_ready, &ctx.node.name);
    let cluster = select(&endpoints, false);
    let local = select(&endpoints, true);
    let service_ref = ServicePortRef {
        namespace: service.key.namespace.as_str().into(),
        name: service.key.name.as_str().into(),
        port_name: port.name.into(),
    };
    let spec = |kind, backends: &[BackendSpec], snat_remote| FrontendSpec {
        service: service_ref.clone(),
        kind,
        backends: backends.to_vec(),
        snat_remote,
        affinity_timeout_s: service.affinity_timeout_s,
    };
    let mut claim = |addr, frontend_port, external, internal| {
        claims.push(Claim {
            addr,
            port: frontend_port,
            proto: port.proto,
            external,
            internal,
        });
    };

    // kube-proxy applies internalTrafficPolicy to all cluster-IP traffic, whatever its source.
    let to_cluster_ip = if service.internal_local {
        &local
    } else {
        &cluster
    };
    claim(
        service.cluster_ip,
        port.port,
        spec(FrontendKind::ClusterIp, to_cluster_ip, true),
        spec(FrontendKind::ClusterIp, to_cluster_ip, true),
    );

    // NodePort, LoadBalancer and ExternalIp share the external policy.
    let mut external = Vec::new();
    if let Some(node_port) = port
        .node_port
        .filter(|_| service.type_ != ServiceType::ClusterIp)
    {
        for &addr in &ctx.node_addresses {
            external.push((addr, node_port, FrontendKind::NodePort));
        }
    }
    for &addr in &service.external_ips {
        external.push((addr, port.port, FrontendKind::ExternalIp));
    }
    if service.type_ == ServiceType::LoadBalancer {
        for &addr in &service.ingress_ips {
            external.push((addr, port.port, FrontendKind::LoadBalancer));
        }
    }
    let (from_nic, snat) = if service.external_local {
        (&local, false)
    } else {
        (&cluster, true)
    };
    for (addr, frontend_port, kind) in external {
        claim(
            addr,
            frontend_port,
            spec(kind, from_nic, snat),
            spec(kind, &cluster, true),
        );
    }
}

/// The endpoints of one service port across its slices, one per address:port, sorted.
fn merge_endpoints(
    slices: &[ValidSlice<'_>],
    port: &ValidPort<'_>,
    publish_not_ready: bool,
    node_name: &str,
) -> Vec<Endpoint> {
    let mut merged: BTreeMap<BackendAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.proto == port.proto)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let addr = BackendAddr {
                addr: e.addr,
                port: slice_port.port,
                proto: port.proto,
            };
            let endpoint = Endpoint {
                backend: BackendSpec {
                    addr,
                    local: e.node_name == Some(node_name),
                },
                ready: e.ready || publish_not_ready,
                serving: e.serving,
                terminating: e.terminating,
            };
            match merged.entry(addr) {
                Entry::Vacant(entry) => {
                    entry.insert(endpoint);
                }
                Entry::Occupied(mut entry) if endpoint.ready && !entry.get().ready => {
                    entry.insert(endpoint);
                }
                Entry::Occupied(_) => {}
            }
        }
    }
    merged.into_values().collect()
}

/// kube-proxy's endpoint set: the ready endpoints (only this node's if `local_only`), or if
/// there are none, the serving and terminating ones.
fn select(endpoints: &[Endpoint], local_only: bool) -> Vec<BackendSpec> {
    let candidates = || endpoints.iter().filter(|e| !local_only || e.backend.local);
    let ready: Vec<BackendSpec> = candidates()
        .filter(|e| e.ready)
        .map(|e| e.backend)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    candidates()
        .filter(|e| e.serving && e.terminating)
        .map(|e| e.backend)
        .collect()
}

mod parse;
#[cfg(test)]
mod tests;
