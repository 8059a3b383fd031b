//! `cargo xtask bench [datapath|forward|control-plane] [--quick] [--json]`: builds and runs
//! `xlb-bench` (release) for each benchmark asked for, or for all that exist.
//!
//! xtask does not link the benchmarks: they depend on lb-userspace, whose build script needs
//! the eBPF toolchain that `setup` installs first.
use anyhow::bail;
use clap::{Args, ValueEnum};

use crate::{cargo, run, setup};

#[derive(Args)]
pub struct BenchArgs {
    /// The benchmark to run; all that exist when omitted.
    #[arg(value_enum)]
    which: Option<Bench>,
    /// A few runs per case: a smoke test that finishes in seconds.
    #[arg(long)]
    quick: bool,
    /// Print the results as one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// ns per packet of the NIC datapath (BPF_PROG_TEST_RUN).
    Datapath,
    /// Forwarding through the lab's nodes (not implemented yet).
    Forward,
    /// The agent's programming of large clusters (not implemented yet).
    ControlPlane,
}

impl Bench {
    const ALL: [Bench; 3] = [Bench::Datapath, Bench::Forward, Bench::ControlPlane];

    /// The `xlb-bench` subcommand, for benchmarks that exist.
    fn subcommand(self) -> Option<&'static str> {
        match self {
            Bench::Datapath => Some("datapath"),
            Bench::Forward | Bench::ControlPlane => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Bench::Datapath => "datapath",
            Bench::Forward => "forward",
            Bench::ControlPlane => "control-plane",
        }
    }
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let benches: Vec<Bench> = match args.which {
        Some(b) => {
            if b.subcommand().is_none() {
                bail!(
                    "`cargo xtask bench {}` is not implemented yet; only `datapath` exists",
                    b.name()
                );
            }
            vec![b]
        }
        None => Bench::ALL
            .into_iter()
            .filter(|b| b.subcommand().is_some())
            .collect(),
    };
    setup::ensure()?;
    for bench in benches {
        let Some(sub) = bench.subcommand() else {
            continue;
        };
        let mut cmd = cargo();
        cmd.args(["run", "--release", "--quiet", "-p", "xlb-bench", "--", sub]);
        if args.quick {
            cmd.arg("--quick");
        }
        if args.json {
            cmd.arg("--json");
        }
        // The benchmark needs the real datapath, not the placeholder of a skipped build.
        cmd.env_remove("AYA_BUILD_SKIP");
        run(&mut cmd)?;
    }
    Ok(())
}
