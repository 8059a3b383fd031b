//! `xlb`: the agent and its command-line tools.
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig},
    http,
    inspect::{
        self, AddrFilter, CtFilter, ExplainQuery, InspectError, Target, pinned::PinnedMaps, render,
    },
    loader::{self, Capacities, HostRouting},
    model::ModelOptions,
    pin,
    state::Scope,
};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "kube-proxy replacement with an eBPF datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing the agent's arguments buys nothing"
)]
enum Command {
    /// Run the agent: program the datapath from Services and EndpointSlices.
    Agent(AgentArgs),
    /// Remove everything the agent attached and pinned (detaches the datapath).
    Cleanup {
        /// The agent's pin directory.
        #[arg(long, default_value = lb_userspace::pin::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Datapath diagnostics.
    #[command(subcommand)]
    Datapath(DatapathCommand),
    /// Frontends and the backends of their Maglev rings (from the pinned maps).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Backends by id (from the pinned maps).
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Connection tracking entries (from the pinned maps).
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Packets and bytes per datapath verdict, summed over CPUs (from the pinned maps).
    Stats(InspectArgs),
    /// Which frontend an address matches, its eligible backends, and which backend a client
    /// gets, and why (from the pinned maps).
    Explain(ExplainArgs),
}

/// Where the maps are and how to print them; every inspection command takes these.
#[derive(Args)]
struct InspectArgs {
    /// Directory the datapath's maps are pinned in (`<dir>/<map name>`).
    #[arg(long, default_value = pin::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Every frontend (address:port/protocol, scope, service id, flags, ring) with the
    /// distinct backends of its ring.
    List(InspectArgs),
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Every backend id with an address: address:port, locality, generation.
    List(InspectArgs),
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// Conntrack entries: kind (forward/reverse), 5-tuple, backend, SNAT.
    List(ConntrackListArgs),
}

#[derive(Args)]
struct ConntrackListArgs {
    #[command(flatten)]
    inspect: InspectArgs,
    /// Only entries whose source is this address (or address:port).
    #[arg(long, value_name = "IP[:PORT]")]
    src: Option<AddrFilter>,
    /// Only entries whose destination is this address (or address:port).
    #[arg(long, value_name = "IP[:PORT]")]
    dst: Option<AddrFilter>,
    /// Only entries of flows to this backend address (or address:port).
    #[arg(long, value_name = "IP[:PORT]")]
    backend: Option<AddrFilter>,
    /// Show at most N matching entries (the first found; the scan stops there).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

#[derive(Args)]
struct ExplainArgs {
    #[command(flatten)]
    inspect: InspectArgs,
    /// The frontend, as <ip>:<port>/<tcp|udp> (the protocol defaults to tcp).
    target: Target,
    /// A client address:port: say which backend its flow gets.
    #[arg(long, value_name = "IP:PORT")]
    from: Option<SocketAddrV4>,
    /// Only this scope: external (arrived on a NIC) or internal (sent by a pod of this
    /// node). Default: both.
    #[arg(long, value_enum)]
    scope: Option<ScopeArg>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScopeArg {
    External,
    Internal,
}

#[derive(Subcommand)]
enum DatapathCommand {
    /// Load the datapath, attach it to the given interfaces, report what is attached, detach.
    /// Tells whether this kernel and these interfaces can run xlb.
    Probe {
        /// Node NICs to attach the XDP program to.
        #[arg(long = "nic", required = true)]
        nics: Vec<String>,
        /// Pod-facing interfaces to attach the TC program to (ingress).
        #[arg(long = "pod-iface")]
        pod_ifaces: Vec<String>,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Read Services, EndpointSlices and Nodes from this file or directory (re-read on change)
    /// instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Where maps and attachments are pinned; a restarted agent adopts them, so restarts and
    /// upgrades drop no flow. SIGTERM leaves the datapath running; `xlb cleanup` removes it.
    #[arg(long, default_value = lb_userspace::pin::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Kubeconfig for the Kubernetes API (default: in-cluster configuration).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name (as in EndpointSlices' nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// NIC to attach XDP to (repeatable). Default: the interfaces holding the node's addresses.
    #[arg(long = "nic")]
    nics: Vec<String>,
    /// Glob of pod-facing interfaces to attach TC to (repeatable).
    #[arg(long = "pod-ifaces", default_value = "lxc*")]
    pod_ifaces: Vec<String>,
    /// Socket-level load balancing for the processes of this cgroup (v2) directory, e.g.
    /// /sys/fs/cgroup (every process of the node): their connections to a Service from the
    /// host's network namespace (host-network pods, the kubelet) go to its backends, as
    /// kube-proxy's OUTPUT rules do. Off when not given.
    #[arg(long, value_name = "CGROUP_DIR")]
    socket_lb_cgroup: Option<PathBuf>,
    /// How packets that the NIC program translated to a pod of this node reach it: `kernel`
    /// (the node's IP forwarding and netfilter, as with kube-proxy) or `bpf` (handed to the
    /// pod's interface from the NIC's TC ingress hook: faster, but netfilter's FORWARD chain
    /// does not see them, so do not use it where a network policy is enforced there).
    #[arg(long, value_enum, default_value_t = HostRouting::Kernel)]
    host_routing: HostRouting,
    /// Source address of SNATed flows. Default: the node's first address.
    #[arg(long)]
    snat_addr: Option<Ipv4Addr>,
    /// SNAT port range, e.g. 61000-65535 (keep it outside the NodePort and ephemeral ranges).
    #[arg(long, default_value = "61000-65535")]
    snat_ports: String,
    /// Only Services labelled service.kubernetes.io/service-proxy-name=<this> (and unlabelled ones).
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// Quiet period before a sync, in milliseconds.
    #[arg(long, default_value_t = 20)]
    debounce_ms: u64,
    /// Longest a change waits for a quiet period, in milliseconds.
    #[arg(long, default_value_t = 250)]
    max_delay_ms: u64,
    /// Map capacities.
    #[arg(long, default_value_t = lb_common::capacity::FRONTENDS)]
    max_frontends: u32,
    #[arg(long, default_value_t = lb_common::capacity::BACKENDS)]
    max_backends: u32,
    #[arg(long, default_value_t = lb_common::capacity::RING_SLOTS)]
    ring_slots: u32,
    #[arg(long, default_value_t = lb_common::capacity::CONNTRACK)]
    max_conntrack: u32,
    #[arg(long, default_value_t = lb_common::capacity::SNAT)]
    max_snat: u32,
    /// Flow table buckets, 3 flows each (rounded up to a power of two). Flows that find their
    /// bucket full go to the conntrack map (--max-conntrack).
    #[arg(long, default_value_t = lb_common::capacity::FLOW_BUCKETS)]
    flow_buckets: u32,
    /// Address of the Prometheus metrics endpoint (/metrics); kube-proxy's default.
    #[arg(long, default_value = http::DEFAULT_METRICS_ADDR)]
    metrics_addr: SocketAddr,
    /// Address of the health endpoints (/healthz, /readyz); kube-proxy's default. May equal
    /// --metrics-addr.
    #[arg(long, default_value = http::DEFAULT_HEALTH_ADDR)]
    health_addr: SocketAddr,
}

fn parse_range(s: &str) -> anyhow::Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .context("expected a range like 61000-65535")?;
    let (a, b): (u16, u16) = (a.trim().parse()?, b.trim().parse()?);
    if a == 0 || a > b {
        bail!("invalid port range {s}");
    }
    Ok((a, b))
}

fn agent_config(a: AgentArgs) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig {
        pin_dir: a.pin_dir,
        manifests: a.manifests,
        kubeconfig: a.kubeconfig,
        node_name: a.node_name,
        nics: a.nics,
        pod_ifaces: a.pod_ifaces,
        socket_lb_cgroup: a.socket_lb_cgroup,
        snat_addr: a.snat_addr,
        snat_ports: parse_range(&a.snat_ports).context("--snat-ports")?,
        debounce: Duration::from_millis(a.debounce_ms),
        max_delay: Duration::from_millis(a.max_delay_ms),
        capacities: Capacities {
            frontends: a.max_frontends,
            backends: a.max_backends,
            ring_slots: a.ring_slots,
            conntrack: a.max_conntrack,
            snat: a.max_snat,
            flow_buckets: a.flow_buckets,
        },
        host_routing: a.host_routing,
        model: ModelOptions {
            service_proxy_name: a.service_proxy_name,
            ..ModelOptions::default()
        },
        manifest_poll: Duration::from_millis(200),
        metrics_addr: a.metrics_addr,
        health_addr: a.health_addr,
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Agent(args) => {
            let cfg = agent_config(args)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::run(cfg)).context("agent")
        }
        Command::Cleanup { pin_dir } => {
            let removed = loader::cleanup(&pin_dir).context("cleanup")?;
            println!(
                "removed {} pinned object(s) under {}",
                removed.len(),
                pin_dir.display()
            );
            Ok(())
        }
        Command::Datapath(DatapathCommand::Probe { nics, pod_ifaces }) => probe(&nics, &pod_ifaces),
        Command::Service(ServiceCommand::List(args)) => run_inspect(&args, |m| {
            render_view(
                &args,
                inspect::services(m)?.as_slice(),
                render::services_table,
            )
        }),
        Command::Backend(BackendCommand::List(args)) => run_inspect(&args, |m| {
            render_view(
                &args,
                inspect::backends(m)?.as_slice(),
                render::backends_table,
            )
        }),
        Command::Conntrack(ConntrackCommand::List(a)) => {
            let filter = CtFilter {
                src: a.src,
                dst: a.dst,
                backend: a.backend,
                limit: a.limit.unwrap_or(0),
            };
            run_inspect(&a.inspect, |m| {
                let (views, truncated) = inspect::conntrack(m, &filter)?;
                if truncated {
                    eprintln!(
                        "showing the first {} matching entries (--limit); more exist",
                        views.len()
                    );
                }
                render_view(&a.inspect, views.as_slice(), render::conntrack_table)
            })
        }
        Command::Stats(args) => run_inspect(&args, |m| {
            render_view(&args, inspect::stats(m)?.as_slice(), render::stats_table)
        }),
        Command::Explain(a) => {
            let query = ExplainQuery {
                target: a.target,
                from: a.from,
                scope: a.scope.map(|s| match s {
                    ScopeArg::External => Scope::External,
                    ScopeArg::Internal => Scope::Internal,
                }),
            };
            run_inspect(&a.inspect, |m| {
                let e = inspect::explain(m, &query)?;
                render_view(&a.inspect, &e, render::explanation_text)
            })
        }
    }
}

/// A view as a table or as JSON.
fn render_view<T: serde::Serialize + ?Sized>(
    args: &InspectArgs,
    view: &T,
    table: impl Fn(&T) -> String,
) -> Result<String, InspectError> {
    match args.output {
        Output::Table => Ok(table(view)),
        Output::Json => render::json(view),
    }
}

/// Opens the pinned maps, builds and prints a view. Errors are one line on stderr and exit
/// code 1; a closed stdout (`| head`) ends the output quietly.
fn run_inspect(
    args: &InspectArgs,
    view: impl FnOnce(&PinnedMaps) -> Result<String, InspectError>,
) -> anyhow::Result<()> {
    let out = PinnedMaps::open(&args.pin_dir)
        .map_err(InspectError::from)
        .and_then(|m| view(&m));
    match out {
        Ok(text) => match std::io::stdout().lock().write_all(text.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(()),
        },
        Err(e) => {
            eprintln!("xlb: {:#}", anyhow::Error::from(e));
            std::process::exit(1);
        }
    }
}

fn probe(nics: &[String], pod_ifaces: &[String]) -> anyhow::Result<()> {
    let mut ebpf = loader::load(&Capacities::small()).context("loading the datapath")?;
    for nic in nics {
        loader::attach_nic(&mut ebpf, nic).with_context(|| format!("attaching XDP to {nic}"))?;
        println!("attached {} (XDP, driver mode) to {nic}", loader::PROG_NIC);
    }
    for iface in pod_ifaces {
        loader::attach_pod(&mut ebpf, iface).with_context(|| format!("attaching TC to {iface}"))?;
        println!("attached {} (tcx ingress) to {iface}", loader::PROG_POD);
    }
    drop(ebpf);
    println!("detached: dropping the links removed every attachment");
    Ok(())
}
