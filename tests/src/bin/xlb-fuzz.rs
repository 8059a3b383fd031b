//! `xlb-fuzz`: the packet fuzzer (`cargo xtask fuzz` builds and runs it as root). Runs in a
//! node namespace of its own (the lab), so the datapath's FIB lookups see the lab's routes and
//! nothing of the host's. Exits 1 if any packet broke a rule of the oracle.
use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use xlb_tests::{
    fuzz,
    node::{Node, ifindex},
};

#[derive(Parser)]
#[command(
    name = "xlb-fuzz",
    about = "Fuzz the datapath's programs with mutated frames"
)]
struct Args {
    /// Frames per program.
    #[arg(long, default_value_t = 10_000)]
    packets: u64,
    /// Seed of the mutations: the same seed and corpus give the same run.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory of corpus frames (one per file): the packet tests' inputs, which they keep
    /// where `XLB_PACKET_CORPUS` says.
    #[arg(long, env = "XLB_PACKET_CORPUS")]
    corpus: Option<PathBuf>,
    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let corpus = args
        .corpus
        .as_deref()
        .map(fuzz::corpus_from)
        .unwrap_or_default();
    let node = match Node::new("fuzz") {
        Ok(node) => node,
        Err(e) => {
            eprintln!("xlb-fuzz: cannot build the node namespace: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = node.ns.enter(|| {
        fuzz::run(
            args.packets,
            args.seed,
            &corpus,
            ifindex("eth0"),
            ifindex("lxc0"),
        )
    });
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xlb-fuzz: cannot enter the node namespace: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{}", fuzz::to_json(&report));
    } else {
        print!("{}", fuzz::render(&report));
    }
    if report.violations_total == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
