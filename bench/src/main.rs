//! `xlb-bench`: xlb's benchmarks. `cargo xtask bench` builds and runs it (as root).
//!
//! Today: `datapath`, the NIC program's cost per packet through `BPF_PROG_TEST_RUN`. The
//! forwarding benchmark (real packets through the lab) and the control-plane benchmark
//! (sync time for large clusters) come as further subcommands.
mod control_plane;
mod datapath;
mod forward;
mod report;
mod rules;
mod scenario;
mod snat;
mod stats;

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xlb-bench", about = "xlb's benchmarks (run as root)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// ns per packet of the NIC datapath (BPF_PROG_TEST_RUN, repeat = 1, interleaved cases).
    Datapath(DatapathArgs),
    /// Packets/s through a lab node: xlb vs kube-proxy's iptables and nftables rulesets and a
    /// no-NAT ceiling.
    Forward(ForwardArgs),
    /// The agent: full sync and change latency at 10,000 Services, and its RSS.
    ControlPlane(ControlPlaneArgs),
    /// Sustained new TCP connections per second through one node to a remote backend (SNAT):
    /// xlb vs kube-proxy's iptables ruleset.
    Snat(SnatArgs),
    /// Combine the JSON the benchmarks wrote into report.md, PNG charts and results.json.
    Report,
    /// Print the kube-proxy ruleset the forwarding benchmark loads for N Services.
    Rules(RulesArgs),
}

#[derive(Args)]
struct ControlPlaneArgs {
    /// Fewer changes and runs: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout (the table goes to stderr then).
    #[arg(long)]
    json: bool,
    /// Where to write the JSON results [default: <target dir>/bench/control-plane.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip the agent RSS measurement (needs the release xlb binary and a lab).
    #[arg(long)]
    no_rss: bool,
}

#[derive(Args)]
struct SnatArgs {
    /// 10 s per dataplane instead of 120 s: a smoke test.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout (the table goes to stderr then).
    #[arg(long)]
    json: bool,
    /// Where to write the JSON results [default: <target dir>/bench/snat.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds of load per dataplane (10..=600).
    #[arg(long, value_parser = clap::value_parser!(u64).range(10..=600))]
    seconds: Option<u64>,
}

#[derive(Args)]
struct RulesArgs {
    /// `iptables` (an iptables-restore file) or `nftables` (an nft -f script).
    #[arg(value_parser = ["iptables", "nftables"])]
    mode: String,
    /// Number of Services (the measured one among them).
    #[arg(long, default_value_t = 1)]
    services: usize,
}

#[derive(Args)]
struct ForwardArgs {
    /// One short repetition: a smoke test of well under a minute.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout (the table goes to stderr then).
    #[arg(long)]
    json: bool,
    /// Where to write the JSON results [default: <target dir>/bench/forward.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Generator threads (1 or 2).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    threads: Option<u8>,
    /// Repetitions (each runs every dataplane once).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=9))]
    reps: Option<u8>,
    /// Seconds of load per mix and trial (at most 10).
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Args)]
struct DatapathArgs {
    /// A few thousand runs per case: a smoke test that finishes in seconds.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on stdout (the table goes to stderr then).
    #[arg(long)]
    json: bool,
    /// Where to write the JSON results [default: <target dir>/bench/datapath.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure only the floor and this case (for profiling one path).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(datapath::case_keys()))]
    only: Option<String>,
}

fn main() -> ExitCode {
    // Labs are torn down on Ctrl-C too.
    lb_lab::teardown_on_signal();
    let result = match Cli::parse().bench {
        Bench::Datapath(args) => datapath_bench(&args),
        Bench::Forward(args) => forward_bench(&args),
        Bench::ControlPlane(args) => control_plane_bench(&args),
        Bench::Snat(args) => snat_bench(&args),
        Bench::Report => combined_report(),
        Bench::Rules(args) => {
            print_rules(&args);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, else `target/` in the workspace.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).join("target")
}

/// Writes `json` to `out` (creating its directory).
fn write_json(out: &Path, json: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(json)?;
    fs::write(out, format!("{text}\n")).with_context(|| format!("writing {}", out.display()))
}

/// Prints the table and where the results went; with `json`, the table goes to stderr and
/// the JSON object to stdout.
/// Writes a benchmark's JSON (to `out`, else `<target>/bench/<name>.json`) and presents it.
fn publish(
    table: &str,
    json: &serde_json::Value,
    out: Option<&Path>,
    name: &str,
    print_json: bool,
) -> anyhow::Result<()> {
    let out = out.map_or_else(
        || target_dir().join(format!("bench/{name}.json")),
        Path::to_path_buf,
    );
    write_json(&out, json)?;
    present(table, &out, print_json.then_some(json))
}

fn present(table: &str, out: &Path, json: Option<&serde_json::Value>) -> anyhow::Result<()> {
    if let Some(json) = json {
        eprint!("{table}");
        eprintln!("results written to {}", out.display());
        println!("{}", serde_json::to_string(json)?);
    } else {
        print!("{table}");
        println!("results written to {}", out.display());
    }
    Ok(())
}

fn control_plane_bench(args: &ControlPlaneArgs) -> anyhow::Result<()> {
    if !lb_lab::is_root() {
        bail!("the control-plane benchmark loads eBPF maps: run it as root");
    }
    let mut plan = if args.quick {
        control_plane::Plan::QUICK
    } else {
        control_plane::Plan::FULL
    };
    plan.rss = !args.no_rss;
    let xlb = if plan.rss {
        Some(forward::Bins::find(&target_dir())?.xlb)
    } else {
        None
    };
    let machine = report::Machine::probe();
    let results = control_plane::run_bench(plan, xlb.as_deref())?;
    let table = control_plane::table(&results, &machine, args.quick);
    let json = control_plane::json(&results, &machine, args.quick);
    publish(
        &table,
        &json,
        args.out.as_deref(),
        "control-plane",
        args.json,
    )
}

fn combined_report() -> anyhow::Result<()> {
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let w = report::combined::write(&dir)?;
    eprintln!("report: {}", w.report.display());
    eprintln!("results: {}", w.results.display());
    for c in &w.charts {
        eprintln!("chart: {}", c.display());
    }
    Ok(())
}

fn print_rules(args: &RulesArgs) {
    // The lab's addresses: node 1 and its first three pods.
    let node_ip = std::net::Ipv4Addr::new(192, 168, 50, 11);
    let pods: Vec<std::net::Ipv4Addr> = (5..8)
        .map(|i| std::net::Ipv4Addr::new(10, 244, 1, i))
        .collect();
    let ports = forward::scenario::service_ports(args.services.max(1), &pods);
    let net = forward::scenario::net(node_ip);
    if args.mode == "iptables" {
        print!("{}", rules::iptables::restore(&ports, &net));
    } else {
        print!("{}", rules::nftables::ruleset(&ports, &net));
    }
}

fn forward_bench(args: &ForwardArgs) -> anyhow::Result<()> {
    if !lb_lab::is_root() {
        bail!("the forwarding benchmark builds network namespaces: run it as root");
    }
    let mut plan = if args.quick {
        forward::Plan::QUICK
    } else {
        forward::Plan::FULL
    };
    if let Some(t) = args.threads {
        plan.threads = usize::from(t);
    }
    if let Some(r) = args.reps {
        plan.reps = usize::from(r);
    }
    if let Some(s) = args.seconds {
        if !(0.1..=10.0).contains(&s) {
            bail!("--seconds must be within 0.1..=10");
        }
        plan.seconds = s;
    }
    let bins = forward::Bins::find(&target_dir())?;
    let machine = report::Machine::probe();
    let results = forward::run_bench(plan, &bins)?;
    let table = forward::summary::table(&results, &machine, args.quick);
    let json = forward::summary::json(&results, &machine, args.quick);
    publish(&table, &json, args.out.as_deref(), "forward", args.json)
}

fn snat_bench(args: &SnatArgs) -> anyhow::Result<()> {
    if !lb_lab::is_root() {
        bail!("the SNAT benchmark builds network namespaces: run it as root");
    }
    let mut plan = if args.quick {
        snat::Plan::QUICK
    } else {
        snat::Plan::FULL
    };
    if let Some(s) = args.seconds {
        plan.seconds = s;
    }
    let bins = forward::Bins::find(&target_dir())?;
    let machine = report::Machine::probe();
    let runs = snat::run_bench(plan, &bins)?;
    let table = snat::table(&runs, &machine, args.quick);
    let json = snat::json(&runs, &machine, args.quick);
    publish(&table, &json, args.out.as_deref(), "snat", args.json)
}

fn datapath_bench(args: &DatapathArgs) -> anyhow::Result<()> {
    if !lb_lab::is_root() {
        bail!("the datapath benchmark loads eBPF programs: run it as root");
    }
    let mut plan = if args.quick {
        datapath::Plan::QUICK
    } else {
        datapath::Plan::FULL
    };
    plan.only = args
        .only
        .as_deref()
        .and_then(|o| datapath::case_keys().find(|k| *k == o));
    let machine = report::Machine::probe();
    let results = datapath::run_bench(plan)?;
    let table = report::datapath::table(&results, &machine);
    let json = report::datapath::json(&results, &machine, args.quick);
    let text = serde_json::to_string_pretty(&json)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench/datapath.json"));
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&out, format!("{text}\n")).with_context(|| format!("writing {}", out.display()))?;
    if args.json {
        eprint!("{table}");
        eprintln!("results written to {}", out.display());
        println!("{}", serde_json::to_string(&json)?);
    } else {
        print!("{table}");
        println!("results written to {}", out.display());
    }
    Ok(())
}
