//! `xlb`: the agent and its command-line tools.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use lb_userspace::{
    agent::{self, AgentConfig},
    http,
    loader::{self, Capacities},
    model::ModelOptions,
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
    /// Datapath diagnostics.
    #[command(subcommand)]
    Datapath(DatapathCommand),
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
        manifests: a.manifests,
        kubeconfig: a.kubeconfig,
        node_name: a.node_name,
        nics: a.nics,
        pod_ifaces: a.pod_ifaces,
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
        },
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
        Command::Datapath(DatapathCommand::Probe { nics, pod_ifaces }) => probe(&nics, &pod_ifaces),
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
