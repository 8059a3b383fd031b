//! `xlb`: the agent and its command-line tools.
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lb_userspace::loader;

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
enum Command {
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Datapath(DatapathCommand::Probe { nics, pod_ifaces }) => probe(&nics, &pod_ifaces),
    }
}

fn probe(nics: &[String], pod_ifaces: &[String]) -> anyhow::Result<()> {
    let mut ebpf = loader::load(&loader::Capacities::small()).context("loading the datapath")?;
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
