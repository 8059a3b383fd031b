//! `xlb-bench`: xlb's benchmarks. `cargo xtask bench` builds and runs it (as root).
//!
//! Today: `datapath`, the NIC program's cost per packet through `BPF_PROG_TEST_RUN`. The
//! forwarding benchmark (real packets through the lab) and the control-plane benchmark
//! (sync time for large clusters) come as further subcommands.
mod datapath;
mod report;
mod rules;
mod scenario;
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
    let result = match Cli::parse().bench {
        Bench::Datapath(args) => datapath_bench(&args),
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
    let table = report::table(&results, &machine);
    let json = report::json(&results, &machine, args.quick);
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
