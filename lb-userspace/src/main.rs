//! `xlb`: the agent and its command-line tools.
use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, AgentConfig},
    control::{model::ModelOptions, state::Scope},
    datapath::{
        loader::{self, Capacities, HostRouting},
        pin, snat,
    },
    ops::{
        http,
        inspect::{
            self, AddrFilter, CtFilter, ExplainQuery, InspectError, Target, pinned::PinnedMaps,
            render,
        },
    },
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
    /// Log line format on stderr: text for people, JSON (one object per line) for log
    /// collectors. The level comes from `RUST_LOG` (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
        #[arg(long, default_value = lb_userspace::datapath::pin::DEFAULT_PIN_DIR)]
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
    /// Print a shell completion script for xlb (e.g. `xlb completions bash >
    /// /etc/bash_completion.d/xlb`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
        #[arg(long = "nic")]
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
    #[arg(long, default_value = lb_userspace::datapath::pin::DEFAULT_PIN_DIR)]
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
    /// SNAT port ranges, comma-separated (at most 4): the ports a flow SNATed to a backend
    /// on another node gets, per backend. Keep them outside the NodePort range and the
    /// node's `ip_local_port_range` (32768-60999 by default).
    #[arg(long, default_value = snat::DEFAULT_RANGES)]
    snat_ports: String,
    /// Add the SNAT port ranges to the node's `net.ipv4.ip_local_reserved_ports`, so the
    /// kernel never gives one to a node process's socket (`xlb cleanup` removes them again).
    /// With `false`, new SNATed flows skip the ports of `ip_local_port_range` instead.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    reserve_snat_ports: bool,
    /// Idle timeout of established TCP flows (kube-proxy's default: above the 2 h TCP
    /// keepalive interval, so idle connections that keep themselves alive never lose their
    /// backend or SNAT port). Go duration syntax: 24h, 90m, 3600s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: u32,
    /// Idle timeout of TCP flows closed in one direction only (kube-proxy's default).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: u32,
    /// How long the SNAT port of a flow whose backend closed first stays with it: the
    /// backend's `TIME_WAIT` (60 s on Linux) and a margin. Raise it for backends with a longer
    /// `TIME_WAIT` (Windows: 120-240 s).
    #[arg(long, default_value = "65s", value_parser = parse_duration)]
    snat_tcp_time_wait: u32,
    /// Idle timeout of UDP flows unanswered or answered within 2 s (kernel conntrack's).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    conntrack_udp_timeout: u32,
    /// Idle timeout of UDP flows still active 2 s after their first packet (kernel's).
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    conntrack_udp_timeout_stream: u32,
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
    /// SNAT table entries (SNATed flows, live or within their close timeout), 3 per bucket
    /// (rounded up to a power of two buckets).
    #[arg(long, default_value_t = lb_common::capacity::NAT_BUCKETS * lb_common::FLOW_WAYS as u32)]
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

/// Parses a duration as kube-proxy's flags take it (Go's syntax: `24h`, `1h30m`, `65s`,
/// `24h0m0s`) into whole seconds (at least 1). Written here: the crates that parse durations
/// take other syntaxes, and these flags should read as kube-proxy's do.
fn parse_duration(s: &str) -> Result<u32, String> {
    let mut total: u64 = 0;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?}: expected a number before a unit (h, m, s)"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3600,
            "m" => 60,
            "s" => 1,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (h, m, s)")),
        };
        total = total.saturating_add(n.saturating_mul(scale));
        rest = tail;
    }
    u32::try_from(total)
        .ok()
        .filter(|t| *t > 0)
        .ok_or_else(|| format!("{s:?}: must be between 1s and {}s", u32::MAX))
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
        snat_ports: snat::parse_ranges(&a.snat_ports).context("--snat-ports")?,
        reserve_snat_ports: a.reserve_snat_ports,
        timeouts: lb_common::Timeouts {
            tcp_established_s: a.conntrack_tcp_timeout_established,
            tcp_half_closed_s: a.conntrack_tcp_timeout_close_wait,
            tcp_time_wait_s: a.snat_tcp_time_wait,
            udp_s: a.conntrack_udp_timeout,
            udp_stream_s: a.conntrack_udp_timeout_stream,
            ..lb_common::Timeouts::default()
        },
        debounce: Duration::from_millis(a.debounce_ms),
        max_delay: Duration::from_millis(a.max_delay_ms),
        capacities: Capacities {
            frontends: a.max_frontends,
            backends: a.max_backends,
            ring_slots: a.ring_slots,
            conntrack: a.max_conntrack,
            nat_buckets: a.max_snat.div_ceil(lb_common::FLOW_WAYS as u32),
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            // Into a buffer first: the generator panics on a failed write (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "xlb", &mut script);
            std::io::stdout()
                .write_all(&script)
                .context("writing the completion script")
        }
        Command::Agent(args) => {
            let cfg = agent_config(args)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(agent::run(cfg)).context("agent")
        }
        Command::Cleanup { pin_dir } => {
            match agent::release_reserved_ports(&pin_dir) {
                Ok(released) if !released.is_empty() => println!(
                    "removed {} from net.ipv4.ip_local_reserved_ports",
                    snat::format_port_list(&released)
                ),
                Ok(_) => {}
                Err(e) => eprintln!("xlb: the SNAT ports stay reserved: {e}"),
            }
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
    // How much of the verifier's budget (1,000,000 instructions per program) each program
    // used: growth shows here before a load fails.
    for (name, prog) in ebpf.programs() {
        if let Ok(info) = prog.info()
            && let Some(n) = info.verified_instruction_count()
        {
            println!("{name}: the verifier processed {n} instructions");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_read_as_kube_proxy_flags() {
        assert_eq!(parse_duration("24h"), Ok(86_400));
        assert_eq!(parse_duration("24h0m0s"), Ok(86_400));
        assert_eq!(parse_duration("1h30m"), Ok(5_400));
        assert_eq!(parse_duration("65s"), Ok(65));
        assert_eq!(parse_duration("2m"), Ok(120));
        for bad in ["", "0s", "10", "5d", "h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
