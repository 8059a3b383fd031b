//! The manifests under `deploy/` as the API server would read them: every YAML document parses
//! into its k8s-openapi type without losing a key (k8s-openapi ignores unknown fields, so a
//! typo like `hostNetwrok` would otherwise pass silently), the RBAC rules are exactly what the
//! agent needs, and the DaemonSet has what a kube-proxy replacement must have. No root needed.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_userspace::ops::http::{DEFAULT_HEALTH_ADDR, DEFAULT_METRICS_ADDR};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The kustomizations under `deploy/` (the base and the overlays), by directory name.
fn kustomizations() -> Vec<String> {
    let mut dirs: Vec<String> = fs::read_dir(deploy_dir())
        .expect("deploy/ exists")
        .map(|e| e.expect("readable deploy/").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
        .collect();
    dirs.sort();
    dirs
}

/// What `kubectl kustomize deploy/<dir>` renders: what `kubectl apply -k` would send.
fn render(dir: &str) -> String {
    let path = deploy_dir().join(dir);
    let out = match Command::new("kubectl").arg("kustomize").arg(&path).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run kubectl ({e}): these tests render deploy/ with `kubectl kustomize` \
             (kustomize is built into kubectl); install kubectl and put it on PATH"
        ),
    };
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// Every object one kustomization renders.
#[derive(Default)]
struct Manifests {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
}

/// Each kustomization's name and rendered objects.
fn load_all() -> Vec<(String, Manifests)> {
    let dirs = kustomizations();
    assert_eq!(
        dirs,
        ["base", "instead-of-kube-proxy", "next-to-kube-proxy"],
        "the base and one overlay per documented mode"
    );
    dirs.into_iter()
        .map(|dir| {
            let text = render(&dir);
            let m = parse(&dir, &text);
            (dir, m)
        })
        .collect()
}

fn parse(source: &str, text: &str) -> Manifests {
    let mut m = Manifests::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let what = format!("{source} document {}", i + 1);
        let yaml =
            serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
        if yaml.is_null() {
            continue;
        }
        let json = serde_json::to_value(&yaml)
            .unwrap_or_else(|e| panic!("{what}: not a JSON-like document: {e}"));
        let api_version = json["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = json["kind"].as_str().unwrap_or_default().to_owned();
        match (api_version.as_str(), kind.as_str()) {
            ("apps/v1", "DaemonSet") => m.daemon_sets.push(typed(&what, &json)),
            ("v1", "ServiceAccount") => m.service_accounts.push(typed(&what, &json)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                m.cluster_roles.push(typed(&what, &json));
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                m.cluster_role_bindings.push(typed(&what, &json));
            }
            other => panic!("{what}: unexpected object {other:?}"),
        }
    }
    m
}

/// `json` as a `T`, failing if the typed object does not carry every key of the document.
fn typed<T: DeserializeOwned + Serialize>(what: &str, json: &Value) -> T {
    let object: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse as its kind: {e}"));
    let back = serde_json::to_value(&object).expect("serializable");
    if let Err(lost) = same_keys(json, &back, "") {
        panic!("{what}: {lost} (a misspelt or misplaced field?)");
    }
    object
}

/// Every key and value of `original` is in `typed`, at the same place.
fn same_keys(original: &Value, typed: &Value, at: &str) -> Result<(), String> {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let path = format!("{at}.{key}");
                let other = b
                    .get(key)
                    .ok_or_else(|| format!("field {path} is not part of the type"))?;
                same_keys(value, other, &path)?;
            }
            Ok(())
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .try_for_each(|(i, (x, y))| same_keys(x, y, &format!("{at}[{i}]"))),
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{at} reads back as {b} instead of {a}")),
    }
}

fn one<'a, T>(what: &str, items: &'a [T]) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}");
    &items[0]
}

#[test]
fn a_misspelt_field_is_caught() {
    let json: Value = serde_json::from_str(
        r#"{"apiVersion":"v1","kind":"ServiceAccount",
            "metadata":{"name":"xlb","namespace":"kube-system","lables":{"a":"b"}}}"#,
    )
    .expect("json");
    let err = std::panic::catch_unwind(|| typed::<ServiceAccount>("doc", &json))
        .expect_err("the typo must fail");
    let message = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains(".metadata.lables"), "{message}");
}

#[test]
fn every_document_parses_and_keeps_its_fields() {
    for (mode, m) in &load_all() {
        one(&format!("{mode}: DaemonSet"), &m.daemon_sets);
        one(&format!("{mode}: ServiceAccount"), &m.service_accounts);
        one(&format!("{mode}: ClusterRole"), &m.cluster_roles);
        one(
            &format!("{mode}: ClusterRoleBinding"),
            &m.cluster_role_bindings,
        );
    }
}

#[test]
fn rbac_grants_exactly_what_the_agent_reads() {
    for (mode, m) in &load_all() {
        let role = one(&format!("{mode}: ClusterRole"), &m.cluster_roles);
        let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for rule in role.rules.as_deref().unwrap_or_default() {
            assert!(rule.resource_names.is_none(), "{rule:?}");
            assert!(rule.non_resource_urls.is_none(), "{rule:?}");
            for group in rule.api_groups.as_deref().unwrap_or_default() {
                for resource in rule.resources.as_deref().unwrap_or_default() {
                    granted
                        .entry((group.clone(), resource.clone()))
                        .or_default()
                        .extend(rule.verbs.iter().cloned());
                }
            }
        }
        let expected: BTreeMap<(String, String), BTreeSet<String>> = [
            ("", "services", &["list", "watch"][..]),
            ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
            ("", "nodes", &["get", "list", "watch"]),
        ]
        .into_iter()
        .map(|(g, r, verbs)| {
            (
                (g.to_owned(), r.to_owned()),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect();
        assert_eq!(granted, expected);

        let account = one(&format!("{mode}: ServiceAccount"), &m.service_accounts);
        let binding = one(
            &format!("{mode}: ClusterRoleBinding"),
            &m.cluster_role_bindings,
        );
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
        let subjects = binding.subjects.as_deref().unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{subjects:?}");
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
        assert_eq!(subjects[0].namespace, account.metadata.namespace);
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().expect("a pod template")
}

fn port_of(addr: &str) -> i32 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("an address with a port")
}

fn agent_container(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "one container: the agent");
    &pod.containers[0]
}

#[test]
fn the_daemon_set_runs_on_every_node_in_the_host_network() {
    for (mode, m) in &load_all() {
        let ds = one(&format!("{mode}: DaemonSet"), &m.daemon_sets);
        let account = one(&format!("{mode}: ServiceAccount"), &m.service_accounts);
        assert_eq!(ds.metadata.namespace, account.metadata.namespace);
        let spec = &ds.spec;
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone());
        let selected = spec.selector.match_labels.clone().expect("matchLabels");
        let template_labels = template_labels.expect("template labels");
        for (k, v) in &selected {
            assert_eq!(
                template_labels.get(k),
                Some(v),
                "selector {k} misses the pods"
            );
        }

        let pod = pod_spec(ds);
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.service_account_name, account.metadata.name);
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let tolerations = pod.tolerations.as_deref().unwrap_or_default();
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.is_none()),
            "the agent must tolerate every taint: {tolerations:?}"
        );
    }
}

#[test]
fn the_agent_knows_its_node_and_may_load_ebpf() {
    for (mode, m) in &load_all() {
        let c = agent_container(pod_spec(one(&format!("{mode}: DaemonSet"), &m.daemon_sets)));
        let args = c.args.as_deref().unwrap_or_default();
        assert_eq!(
            args.get(..3).unwrap_or(args),
            [
                "agent",
                "--node-name=$(NODE_NAME)",
                "--socket-lb-cgroup=/run/xlb/cgroupv2"
            ],
            "{mode}"
        );
        assert_eq!(&args[3..], mode_args(mode), "{mode}");
        let node_name = c
            .env
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME in env");
        let field = node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .expect("NODE_NAME from a fieldRef");
        assert_eq!(field.field_path, "spec.nodeName");

        let security = c.security_context.as_ref().expect("securityContext");
        let caps: BTreeSet<&str> = security
            .capabilities
            .as_ref()
            .and_then(|c| c.add.as_deref())
            .unwrap_or_default()
            .iter()
            .map(String::as_str)
            .collect();
        assert!(
            security.privileged == Some(true)
                || ["BPF", "NET_ADMIN", "SYS_ADMIN"]
                    .iter()
                    .all(|cap| caps.contains(cap)),
            "the agent loads and attaches eBPF programs: {security:?}"
        );
    }
}

#[test]
fn the_agent_sees_the_hosts_bpffs_sysfs_and_cgroups() {
    for (mode, m) in &load_all() {
        let pod = pod_spec(one(&format!("{mode}: DaemonSet"), &m.daemon_sets));
        let c = agent_container(pod);
        let volumes = pod.volumes.as_deref().unwrap_or_default();
        let host_path_of = |mount_path: &str| {
            let mount = c
                .volume_mounts
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|m| m.mount_path == mount_path)
                .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
            let volume = volumes
                .iter()
                .find(|v| v.name == mount.name)
                .unwrap_or_else(|| panic!("no volume {}", mount.name));
            (
                volume.host_path.as_ref().map(|h| h.path.clone()),
                mount.mount_propagation.clone(),
            )
        };
        let (bpffs, propagation) = host_path_of("/sys/fs/bpf");
        assert_eq!(bpffs.as_deref(), Some("/sys/fs/bpf"));
        assert_eq!(
            propagation.as_deref(),
            Some("Bidirectional"),
            "pins must reach the host's bpffs"
        );
        assert_eq!(host_path_of("/sys").0.as_deref(), Some("/sys"));
        // Socket-level load balancing for the host's processes: the cgroup v2 root given in args.
        assert_eq!(
            host_path_of("/run/xlb/cgroupv2").0.as_deref(),
            Some("/sys/fs/cgroup")
        );
    }
}

#[test]
fn probes_and_ports_are_the_agents() {
    for (mode, m) in &load_all() {
        let c = agent_container(pod_spec(one(&format!("{mode}: DaemonSet"), &m.daemon_sets)));
        // Probes on the agent's health port, at the loopback address it listens on.
        let health_port = port_of(&flag(c, "--health-addr").unwrap_or(DEFAULT_HEALTH_ADDR.into()));
        let metrics_port =
            port_of(&flag(c, "--metrics-addr").unwrap_or(DEFAULT_METRICS_ADDR.into()));
        for (probe, path) in [
            (&c.liveness_probe, "/healthz"),
            (&c.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("an HTTP probe on {path}"));
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::Int(health_port), "{mode} {path}");
            assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{path}");
        }
        let ports = container_ports(c);
        assert_eq!(ports, BTreeSet::from([metrics_port, health_port]), "{mode}");
    }
}

/// The arguments each mode's overlay adds to the base's.
fn mode_args(mode: &str) -> &'static [&'static str] {
    match mode {
        "next-to-kube-proxy" => &[
            "--service-proxy-name=xlb",
            "--metrics-addr=127.0.0.1:19249",
            "--health-addr=127.0.0.1:19256",
        ],
        _ => &[],
    }
}

/// The ports the agent's container declares.
fn container_ports(c: &Container) -> BTreeSet<i32> {
    c.ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| p.container_port)
        .collect()
}

/// The value of `--name=value` among the agent's arguments.
fn flag(c: &Container, name: &str) -> Option<String> {
    c.args
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find_map(|a| Some(a.strip_prefix(name)?.strip_prefix('=')?.to_owned()))
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// Instead of kube-proxy, the agent reaches the API server at its own address and takes
/// kube-proxy's ports; next to it, it takes only labelled Services' name and ports of its own.
#[test]
fn each_overlay_sets_up_its_mode() {
    let kube_proxy_ports = BTreeSet::from([10249, 10256]);
    for (mode, m) in &load_all() {
        let c = agent_container(pod_spec(one(&format!("{mode}: DaemonSet"), &m.daemon_sets)));
        let ports = container_ports(c);
        let api_server = (
            env(c, "KUBERNETES_SERVICE_HOST"),
            env(c, "KUBERNETES_SERVICE_PORT"),
        );
        match mode.as_str() {
            "instead-of-kube-proxy" => {
                assert!(
                    matches!(api_server, (Some(host), Some(port))
                        if host.parse::<std::net::IpAddr>().is_ok() && port.parse::<u16>().is_ok()),
                    "{mode}: the API server's address and port: {api_server:?}"
                );
                assert_eq!(ports, kube_proxy_ports, "{mode}");
                assert_eq!(flag(c, "--service-proxy-name"), None, "{mode}");
            }
            "next-to-kube-proxy" => {
                assert_eq!(api_server, (None, None), "{mode}");
                assert!(ports.is_disjoint(&kube_proxy_ports), "{mode}: {ports:?}");
                assert_eq!(flag(c, "--service-proxy-name").as_deref(), Some("xlb"));
            }
            _ => assert_eq!(api_server, (None, None), "{mode}"),
        }
        assert!(c.image.as_deref().is_some_and(|i| !i.is_empty()), "{mode}");
    }
}
