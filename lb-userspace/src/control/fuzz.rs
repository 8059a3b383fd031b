//! Control-plane fuzzing (property tests, proptest): random clusters of valid Services,
//! EndpointSlices and a Node, with one object mutated at random (fields removed, retyped, set to
//! out-of-range or garbage values, manifest text cut or corrupted), read through the parsing the
//! sources use (the API watch's lenient decoding and [`Mirror`](super::source::kube), manifest
//! files) into the model. Properties, for every case:
//! - nothing panics;
//! - the store holds every other object exactly as it holds it without the mutated one;
//! - an object refused is refused alone: the desired state equals the state computed without
//!   it, and every other refusal is the same;
//! - the incremental translator, updated by the mutated object's watch event, equals a full
//!   translation of the same store.
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::control::{
    invalid::{Invalid, reason},
    model::{Desired, ModelOptions, NodeInfo, Translator, desired},
    source::{kube::replay, manifests, shared::SharedStore},
    store::{ObjectKey, Store, StoredKind},
};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

const NODE: &str = "node-1";

/// One generated valid Service and what its EndpointSlice holds.
#[derive(Clone, Debug)]
struct ServiceCase {
    type_: &'static str,
    /// Per port: UDP (else TCP), target port by name (else by number).
    ports: Vec<(bool, bool)>,
    /// Per endpoint: on this node, ready, terminating.
    endpoints: Vec<(bool, bool, bool)>,
    external_ip: bool,
    external_local: bool,
    affinity: bool,
}

fn service_case() -> impl Strategy<Value = ServiceCase> {
    (
        prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer"]),
        prop::collection::vec((any::<bool>(), any::<bool>()), 1..=3),
        prop::collection::vec((any::<bool>(), any::<bool>(), any::<bool>()), 0..=4),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(type_, ports, endpoints, external_ip, external_local, affinity)| ServiceCase {
                type_,
                ports,
                endpoints,
                external_ip,
                external_local,
                affinity,
            },
        )
}

fn namespace(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "web" } else { "db" }
}

fn service_json(i: usize, case: &ServiceCase) -> Value {
    let ports: Vec<Value> = (case.ports.iter().enumerate())
        .map(|(j, &(udp, named))| {
            let mut port = json!({
                "name": format!("p{j}"),
                "port": 80 + j,
                "protocol": if udp { "UDP" } else { "TCP" },
                "targetPort": if named { json!(format!("t{j}")) } else { json!(8080 + j) },
            });
            if case.type_ != "ClusterIP" {
                port["nodePort"] = json!(30000 + i * 8 + j);
            }
            port
        })
        .collect();
    let mut spec = json!({
        "type": case.type_,
        "clusterIP": format!("10.96.0.{}", i + 1),
        "clusterIPs": [format!("10.96.0.{}", i + 1)],
        "ports": ports,
    });
    if case.external_ip {
        spec["externalIPs"] = json!([format!("198.51.100.{}", i + 1)]);
    }
    if case.type_ != "ClusterIP" && case.external_local {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if case.affinity {
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 300}});
    }
    let mut service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": namespace(i), "name": format!("svc-{i}")},
        "spec": spec,
    });
    if case.type_ == "LoadBalancer" {
        service["status"] =
            json!({"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{}", i + 1)}]}});
    }
    service
}

fn slice_json(i: usize, case: &ServiceCase) -> Value {
    let ports: Vec<Value> = (case.ports.iter().enumerate())
        .map(|(j, &(udp, _))| {
            json!({
                "name": format!("p{j}"),
                "port": 8080 + j,
                "protocol": if udp { "UDP" } else { "TCP" },
            })
        })
        .collect();
    let endpoints: Vec<Value> = (case.endpoints.iter().enumerate())
        .map(|(k, &(local, ready, terminating))| {
            json!({
                "addresses": [format!("10.244.{i}.{}", k + 1)],
                "nodeName": if local { NODE } else { "node-2" },
                "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": namespace(i),
            "name": format!("svc-{i}-x7k2p"),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    })
}

fn node_json() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": NODE},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "192.168.50.11"},
            {"type": "Hostname", "address": NODE},
        ]},
    })
}

/// What one mutation does where its path ends.
#[derive(Clone, Debug)]
enum Op {
    Set(Value),
    Remove,
    Insert(String, Value),
    /// A number becomes its text, text a number, an array an object and so on.
    Retype,
}

/// Values that lie: out of range, of the wrong type, almost right.
fn garbage() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop::sample::select(vec![
            0_i64,
            -1,
            1,
            79,
            80,
            8080,
            30000,
            65535,
            65536,
            1 << 32
        ])
        .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-zA-Z0-9.:/ _-]{0,16}".prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "10.96.0.1",
            "10.96.0.1/24",
            "::1",
            "256.0.0.1",
            "0.0.0.0",
            "None",
            "TCP",
            "UDP",
            "SCTP",
            "Local",
            "Cluster",
            "LoadBalancer",
            "ExternalName",
            "NodePort",
            "IPv6",
            "FQDN",
            "-1",
            "08080",
            "t0",
            "p0",
            "svc-0",
            "node-1",
            "ClientIP",
        ])
        .prop_map(Value::from),
        Just(Value::from("x".repeat(300))),
        Just(json!([])),
        Just(json!({})),
        Just(json!([null])),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "nodePort",
            "clusterIP",
            "clusterIPs",
            "type",
            "ports",
            "port",
            "targetPort",
            "protocol",
            "externalTrafficPolicy",
            "internalTrafficPolicy",
            "externalIPs",
            "sessionAffinity",
            "publishNotReadyAddresses",
            "appProtocol",
            "addresses",
            "conditions",
            "hostname",
            "labels",
            "kubernetes.io/service-name",
            "service.kubernetes.io/service-proxy-name",
            "service.kubernetes.io/headless",
            "endpoints.kubernetes.io/managed-by",
            "ipMode",
            "name",
            "namespace",
        ])
        .prop_map(str::to_owned),
        "[a-z]{1,8}",
    ];
    prop_oneof![
        3 => garbage().prop_map(Op::Set),
        2 => Just(Op::Remove),
        2 => (key, garbage()).prop_map(|(k, v)| Op::Insert(k, v)),
        1 => Just(Op::Retype),
    ]
}

/// A mutation: a walk down the object (each step picks a child by index, modulo) and the op
/// at its end; or a field that matters set to a value of the right type that may be wrong.
#[derive(Clone, Debug)]
enum Mutation {
    Walk(Vec<usize>, Op),
    Field(&'static str, Value),
}

/// Fields the model reads, by JSON pointer, with values of their type (so that the object
/// deserializes and the model, not the decoder, has to judge it).
fn field() -> impl Strategy<Value = Mutation> {
    let number = prop::sample::select(vec![0_i64, -1, 1, 80, 81, 8080, 30000, 30008, 65535, 65536])
        .prop_map(Value::from);
    let text = prop::sample::select(vec![
        "",
        "10.96.0.1",
        "10.96.0.2",
        "10.96.0.1/24",
        "::1",
        "fd00::1",
        "256.0.0.1",
        "0.0.0.0",
        "10.244.0.1",
        "None",
        "TCP",
        "UDP",
        "SCTP",
        "Local",
        "Cluster",
        "ClusterIP",
        "LoadBalancer",
        "ExternalName",
        "NodePort",
        "Headless",
        "IPv4",
        "IPv6",
        "FQDN",
        "p0",
        "t0",
        "http",
        "svc-0",
        "node-1",
        "ClientIP",
        "VIP",
        "Proxy",
        "x",
    ])
    .prop_map(Value::from);
    let numeric = prop::sample::select(vec![
        "/spec/ports/0/port",
        "/spec/ports/1/port",
        "/spec/ports/0/nodePort",
        "/spec/ports/1/nodePort",
        "/spec/ports/0/targetPort",
        "/spec/sessionAffinityConfig/clientIP/timeoutSeconds",
        "/ports/0/port",
        "/ports/1/port",
    ]);
    let textual = prop::sample::select(vec![
        "/spec/type",
        "/spec/clusterIP",
        "/spec/clusterIPs/0",
        "/spec/externalIPs/0",
        "/spec/externalTrafficPolicy",
        "/spec/internalTrafficPolicy",
        "/spec/sessionAffinity",
        "/spec/ports/0/protocol",
        "/spec/ports/1/name",
        "/spec/ports/0/targetPort",
        "/status/loadBalancer/ingress/0/ip",
        "/status/loadBalancer/ingress/0/ipMode",
        "/metadata/labels/kubernetes.io~1service-name",
        "/addressType",
        "/ports/0/protocol",
        "/ports/1/name",
        "/endpoints/0/addresses/0",
        "/endpoints/1/addresses/0",
        "/endpoints/0/nodeName",
        "/status/addresses/0/address",
        "/status/addresses/0/type",
    ]);
    prop_oneof![
        (numeric, number).prop_map(|(at, v)| Mutation::Field(at, v)),
        (textual, text).prop_map(|(at, v)| Mutation::Field(at, v)),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (prop::collection::vec(any::<usize>(), 1..=6), op())
            .prop_map(|(path, op)| Mutation::Walk(path, op)),
        field(),
    ]
}

fn mutate(root: &mut Value, mutation: &Mutation) {
    let (path, op) = match mutation {
        Mutation::Walk(path, op) => (path, op),
        Mutation::Field(at, value) => {
            if let Some(field) = root.pointer_mut(at) {
                *field = value.clone();
            }
            return;
        }
    };
    let mut at = root;
    for (depth, &choice) in path.iter().enumerate() {
        // The op applies to a child of `at` when the path ends here or cannot go deeper.
        let last = depth + 1 == path.len();
        let child_count = match &*at {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        };
        if child_count == 0 {
            apply_here(at, op, None);
            return;
        }
        let index = choice % child_count;
        if last {
            apply_here(at, op, Some(index));
            return;
        }
        at = match at {
            Value::Object(map) => map.values_mut().nth(index),
            Value::Array(items) => items.get_mut(index),
            _ => None,
        }
        .expect("index within the children");
    }
}

/// Applies `op` to child `index` of `parent` (or, for `None`, to `parent` itself).
fn apply_here(parent: &mut Value, op: &Op, index: Option<usize>) {
    if let (Op::Insert(key, value), Value::Object(map)) = (op, &mut *parent) {
        map.insert(key.clone(), value.clone());
        return;
    }
    if let (Op::Remove, Some(index)) = (op, index) {
        match parent {
            Value::Object(map) => {
                if let Some(key) = map.keys().nth(index).cloned() {
                    map.remove(&key);
                }
            }
            Value::Array(items) => drop(items.remove(index)),
            _ => {}
        }
        return;
    }
    let target = match (index, &mut *parent) {
        (Some(i), Value::Object(map)) => map.values_mut().nth(i).expect("child"),
        (Some(i), Value::Array(items)) => &mut items[i],
        (_, target) => target,
    };
    *target = match (op, std::mem::take(target)) {
        (Op::Set(value) | Op::Insert(_, value), _) => value.clone(),
        (Op::Remove, _) => Value::Null,
        (Op::Retype, Value::Number(n)) => Value::from(n.to_string()),
        (Op::Retype, Value::String(s)) => s.parse::<i64>().map_or(json!(0), Value::from),
        (Op::Retype, Value::Bool(b)) => Value::from(b.to_string()),
        (Op::Retype, Value::Array(items)) => Value::Object(
            (items.into_iter().enumerate())
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
        ),
        (Op::Retype, Value::Object(map)) => Value::Array(map.into_iter().map(|(_, v)| v).collect()),
        (Op::Retype, Value::Null) => json!(""),
    };
}

/// A generated cluster with one object mutated.
#[derive(Clone, Debug)]
struct Case {
    services: Vec<ServiceCase>,
    /// Which object is mutated: index into services, then slices, then the Node (modulo).
    target: usize,
    mutations: Vec<Mutation>,
    /// For manifests: cut the mutated document's text at this fraction, or insert a byte.
    text: Option<(u16, Option<char>)>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(service_case(), 1..=5),
        any::<usize>(),
        prop::collection::vec(mutation(), 1..=4),
        prop::option::weighted(0.3, (any::<u16>(), prop::option::of(any::<char>()))),
    )
        .prop_map(|(services, target, mutations, text)| Case {
            services,
            target,
            mutations,
            text,
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

/// The case's objects, the mutated one apart.
struct Objects {
    services: Vec<Value>,
    slices: Vec<Value>,
    node: Vec<Value>,
    mutated: (Kind, Value),
    /// The unmutated version of the mutated object.
    original: Value,
}

impl Objects {
    fn of(case: &Case) -> Self {
        let n = case.services.len();
        let mut services: Vec<Value> = (case.services.iter().enumerate())
            .map(|(i, c)| service_json(i, c))
            .collect();
        let mut slices: Vec<Value> = (case.services.iter().enumerate())
            .map(|(i, c)| slice_json(i, c))
            .collect();
        let mut node = vec![node_json()];
        let target = case.target % (2 * n + 1);
        let (kind, original) = if target < n {
            (Kind::Service, services.remove(target))
        } else if target < 2 * n {
            (Kind::EndpointSlice, slices.remove(target - n))
        } else {
            (Kind::Node, node.remove(0))
        };
        let mut mutated = original.clone();
        for mutation in &case.mutations {
            mutate(&mut mutated, mutation);
        }
        Self {
            services,
            slices,
            node,
            mutated: (kind, mutated),
            original,
        }
    }

    /// The objects of one kind, with the mutated one (at the end) or without it.
    fn of_kind(&self, kind: Kind, with_mutated: bool) -> Vec<Value> {
        let mut objects = match kind {
            Kind::Service => self.services.clone(),
            Kind::EndpointSlice => self.slices.clone(),
            Kind::Node => self.node.clone(),
        };
        if with_mutated && self.mutated.0 == kind {
            objects.push(self.mutated.1.clone());
        }
        objects
    }

    /// The key the mutated object would be stored under, if it has one that parses.
    fn mutated_key(&self) -> Option<ObjectKey> {
        let meta = self.mutated.1.get("metadata")?;
        let name = meta.get("name")?.as_str()?;
        match self.mutated.0 {
            Kind::Node => Some(ObjectKey::cluster(name)),
            _ => Some(ObjectKey::new(meta.get("namespace")?.as_str()?, name)),
        }
    }

    /// Another object of the mutated one's kind has the key it now carries: a legitimate
    /// replacement, not a refusal, which the properties below do not describe.
    fn collides(&self) -> bool {
        let Some(key) = self.mutated_key() else {
            return false;
        };
        self.of_kind(self.mutated.0, false).iter().any(|other| {
            let meta = &other["metadata"];
            meta["name"].as_str() == Some(&*key.name)
                && (self.mutated.0 == Kind::Node
                    || meta["namespace"].as_str() == Some(&*key.namespace))
        })
    }
}

fn node_of(store: &Store) -> NodeInfo {
    NodeInfo::from_store(store, NODE).unwrap_or_else(|| NodeInfo {
        name: NODE.to_owned(),
        addresses: Vec::new(),
    })
}

/// Every object of `without`'s store is in `with`'s store, unchanged.
fn others_kept(with: &Store, without: &Store) -> Result<(), TestCaseError> {
    fn kind<K: StoredKind>(with: &Store, without: &Store) -> Result<(), TestCaseError> {
        for (key, object) in without.iter::<K>() {
            prop_assert_eq!(with.get::<K>(key), Some(object), "{} {} lost", K::KIND, key);
        }
        prop_assert!(with.count::<K>() <= without.count::<K>() + 1);
        Ok(())
    }
    kind::<Service>(with, without)?;
    kind::<EndpointSlice>(with, without)?;
    kind::<Node>(with, without)
}

/// The refusals that name the mutated object leave it out whole (not one port of it).
fn refused_whole(kind: Kind, invalid: &[Invalid], source_refused: bool) -> bool {
    source_refused
        || invalid.iter().any(|i| {
            i.kind == kind.name()
                && i.reason != reason::FRONTEND_CONFLICT
                && i.reason != reason::UNSUPPORTED_PROTOCOL
        })
}

/// The model's properties for one store with the mutated object and one without it.
fn refused_alone(
    objects: &Objects,
    with: &Store,
    with_sources: &[Invalid],
    without: &Store,
    without_sources: &[Invalid],
) -> Result<(), TestCaseError> {
    let opts = ModelOptions::default();
    let kind = objects.mutated.0;
    others_kept(with, without)?;
    // Only the mutated object can be refused by a source: every other one is valid.
    prop_assert!(without_sources.is_empty(), "{:?}", without_sources);
    for invalid in with_sources {
        prop_assert!(
            invalid.kind == kind.name() || invalid.kind == "Document",
            "a source refused another object: {}",
            invalid
        );
    }
    let with_desired = desired(with, &node_of(with), &opts);
    let without_desired = desired(without, &node_of(without), &opts);
    prop_assert!(
        without_desired.invalid.is_empty(),
        "valid objects refused: {:?}",
        without_desired.invalid
    );
    let new_refusals: Vec<Invalid> = with_desired
        .invalid
        .iter()
        .filter(|i| !without_desired.invalid.contains(i))
        .cloned()
        .collect();
    if refused_whole(kind, &new_refusals, !with_sources.is_empty()) {
        prop_assert_eq!(&with_desired.state, &without_desired.state);
        for refusal in &new_refusals {
            prop_assert_eq!(refusal.kind, kind.name(), "{}", refusal);
        }
    }
    Ok(())
}

/// One watch listing per kind into `store`, of the objects `of_kind` gives.
fn list_every_kind(store: &SharedStore, of_kind: impl Fn(Kind) -> Vec<Value>) {
    replay::listing::<Service>("s", store, &of_kind(Kind::Service));
    replay::listing::<EndpointSlice>("e", store, &of_kind(Kind::EndpointSlice));
    replay::listing::<Node>("n", store, &of_kind(Kind::Node));
}

/// The API path: one listing per kind, with and without the mutated object.
fn api_listing(objects: &Objects) -> Result<(), TestCaseError> {
    let list = |with_mutated: bool| {
        let store = SharedStore::new();
        list_every_kind(&store, |kind| objects.of_kind(kind, with_mutated));
        store.read(|store, invalid| (store.clone(), invalid.to_vec()))
    };
    let (with, with_sources) = list(true);
    let (without, without_sources) = list(false);
    refused_alone(objects, &with, &with_sources, &without, &without_sources)
}

/// The API path as a watch event: the cluster listed unmutated, then the mutated version
/// applied. The incremental translator follows both updates and equals a full translation; a
/// refused object replacing its own valid version takes that version's frontends away.
fn api_watch_event(objects: &Objects) -> Result<(), TestCaseError> {
    let opts = ModelOptions::default();
    let store = SharedStore::new();
    let mut originals = objects.of_kind(objects.mutated.0, false);
    originals.push(objects.original.clone());
    let listed = |kind: Kind| {
        if kind == objects.mutated.0 {
            originals.clone()
        } else {
            objects.of_kind(kind, false)
        }
    };
    list_every_kind(&store, listed);
    let mut translator = Translator::new(opts.clone());
    let check = |translator: &mut Translator| {
        store
            .read_changes(|store, changes, invalid| {
                let node = node_of(store);
                translator.update(store, &node, changes);
                (
                    translator.desired(),
                    desired(store, &node, &opts),
                    invalid.to_vec(),
                )
            })
            .0
    };
    let (incremental, full, _) = check(&mut translator);
    prop_assert_eq!(&incremental, &full);
    let (kind, mutated) = &objects.mutated;
    match kind {
        Kind::Service => replay::apply::<Service>("s", &store, mutated),
        Kind::EndpointSlice => replay::apply::<EndpointSlice>("e", &store, mutated),
        Kind::Node => replay::apply::<Node>("n", &store, mutated),
    }
    let (incremental, full, sources): (Desired, Desired, Vec<Invalid>) = check(&mut translator);
    prop_assert_eq!(&incremental, &full);
    let same_key = objects.mutated_key().is_some_and(|key| {
        let original = &objects.original["metadata"];
        original["name"].as_str() == Some(&*key.name)
            && (*kind == Kind::Node || original["namespace"].as_str() == Some(&*key.namespace))
    });
    if same_key && refused_whole(*kind, &full.invalid, !sources.is_empty()) {
        // The last readable version goes with the refusal: as if the object were deleted.
        let without = SharedStore::new();
        list_every_kind(&without, |kind| objects.of_kind(kind, false));
        let expected = without.read(|store, _| desired(store, &node_of(store), &opts));
        prop_assert_eq!(&full.state, &expected.state);
    }
    Ok(())
}

/// The manifest path: every object a YAML (or JSON stream) document; the mutated one's text
/// possibly cut or corrupted.
fn manifest_files(objects: &Objects, case: &Case, json_stream: bool) -> Result<(), TestCaseError> {
    let render = |value: &Value| {
        if json_stream {
            value.to_string()
        } else {
            serde_yaml::to_string(value).expect("JSON values render as YAML")
        }
    };
    let mut mutated = render(&objects.mutated.1);
    if let (false, Some((at, byte))) = (json_stream, case.text) {
        let mut cut = usize::from(at) * mutated.len() / usize::from(u16::MAX);
        while !mutated.is_char_boundary(cut) {
            cut -= 1;
        }
        match byte {
            None => mutated.truncate(cut),
            Some(c) => mutated.insert(cut, c),
        }
        if !mutated.ends_with('\n') {
            // The separator that follows starts a line, as in any file of several documents.
            mutated.push('\n');
        }
        // A new document separator would make two documents of one: not this property's case.
        prop_assume!(
            !mutated
                .lines()
                .any(|l| l.starts_with("---") || l.starts_with("..."))
        );
    }
    let text = |with_mutated: bool| {
        let mut documents: Vec<String> = [Kind::Service, Kind::EndpointSlice, Kind::Node]
            .into_iter()
            .flat_map(|kind| objects.of_kind(kind, false))
            .map(|value| render(&value))
            .collect();
        if with_mutated {
            // In the middle: documents after it must be read as well.
            documents.insert(documents.len() / 2, mutated.clone());
        }
        if json_stream {
            documents.join("\n")
        } else {
            documents.join("---\n")
        }
    };
    let load = |text: &str| {
        let (mut store, mut invalid) = (Store::new(), Vec::new());
        manifests::load_str(text, "fuzz.yaml", &mut store, &mut invalid);
        (store, invalid)
    };
    let (with, with_sources) = load(&text(true));
    let (without, without_sources) = load(&text(false));
    refused_alone(objects, &with, &with_sources, &without, &without_sources)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_object_is_refused_alone(case in case()) {
        let objects = Objects::of(&case);
        prop_assume!(!objects.collides());
        api_listing(&objects)?;
        api_watch_event(&objects)?;
        manifest_files(&objects, &case, false)?;
        manifest_files(&objects, &case, true)?;
    }

    /// Any text at all, as a manifest file or as the body of a watch event: no panic.
    #[test]
    fn any_text_is_read_without_panic(text in ".{0,400}") {
        let (mut store, mut invalid) = (Store::new(), Vec::new());
        manifests::load_str(&text, "fuzz.yaml", &mut store, &mut invalid);
        let store = SharedStore::new();
        if let Ok(value) = serde_json::from_str::<Value>(&text) {
            replay::apply::<Service>("s", &store, &value);
            replay::apply::<EndpointSlice>("e", &store, &value);
            replay::apply::<Node>("n", &store, &value);
        }
    }
}
