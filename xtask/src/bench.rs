//! `cargo xtask bench [datapath|forward|control-plane] [--quick] [--json]`: builds and runs
//! `xlb-bench` (release) for each benchmark asked for, or for all three, then writes the
//! combined report (`target/bench/report.md`, PNG charts, `results.json`) from whatever
//! results are there.
//!
//! xtask does not link the benchmarks: they depend on lb-userspace, whose build script needs
//! the eBPF toolchain that `setup` installs first.
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
    /// Packets/s through a lab node: xlb vs kube-proxy's iptables and nftables rulesets.
    Forward,
    /// The agent: full sync and change latency at 10,000 Services, and its memory.
    ControlPlane,
    /// New TCP connections/s through a node to a remote backend (SNAT): xlb vs iptables.
    Snat,
}

impl Bench {
    const ALL: [Bench; 4] = [
        Bench::Datapath,
        Bench::Forward,
        Bench::ControlPlane,
        Bench::Snat,
    ];

    /// The `xlb-bench` subcommand.
    fn subcommand(self) -> &'static str {
        match self {
            Bench::Datapath => "datapath",
            Bench::Forward => "forward",
            Bench::ControlPlane => "control-plane",
            Bench::Snat => "snat",
        }
    }

    /// Runs the `xlb` agent or the lab's echo server.
    fn needs_binaries(self) -> bool {
        matches!(self, Bench::Forward | Bench::ControlPlane | Bench::Snat)
    }
}

pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let benches: Vec<Bench> = args.which.map_or_else(|| Bench::ALL.to_vec(), |b| vec![b]);
    setup::ensure()?;
    if benches.iter().any(|b| b.needs_binaries()) {
        // The benchmarks start these (the real datapath, not a skipped build's placeholder).
        run(cargo()
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "lb-userspace",
                "--bin",
                "xlb",
            ])
            .args(["-p", "lb-lab", "--bin", "xlb-echo"])
            .env_remove("AYA_BUILD_SKIP"))?;
    }
    for bench in benches {
        let mut cmd = xlb_bench();
        cmd.arg(bench.subcommand());
        if args.quick {
            cmd.arg("--quick");
        }
        if args.json {
            cmd.arg("--json");
        }
        run(&mut cmd)?;
    }
    run(xlb_bench().arg("report"))
}

fn xlb_bench() -> std::process::Command {
    let mut cmd = cargo();
    cmd.args(["run", "--release", "--quiet", "-p", "xlb-bench", "--"]);
    // The benchmark needs the real datapath, not the placeholder of a skipped build.
    cmd.env_remove("AYA_BUILD_SKIP");
    cmd
}
