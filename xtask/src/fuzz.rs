//! `cargo xtask fuzz`: the packet fuzzer (`xlb-fuzz` of the xlb-tests crate) over the packet
//! tests' inputs and generated frames. The packet tests keep their inputs in
//! `<target dir>/fuzz/corpus` (`XLB_PACKET_CORPUS`) whenever `cargo xtask test` or this task
//! runs them; this task runs them first when that directory is empty.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::{cargo, run, setup, target_dir};

#[derive(Args)]
pub struct FuzzArgs {
    /// Frames per program.
    #[arg(long, default_value_t = 100_000)]
    packets: u64,
    /// Seed of the mutations (the same seed and corpus give the same run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object on stdout instead of the text report.
    #[arg(long)]
    json: bool,
}

/// Where the packet tests keep their inputs.
pub fn corpus_dir() -> PathBuf {
    target_dir().join("fuzz/corpus")
}

pub fn run_fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    setup::ensure()?;
    let corpus = corpus_dir();
    let empty = std::fs::read_dir(&corpus).map_or(true, |mut d| d.next().is_none());
    if empty {
        eprintln!(
            "fuzz: collecting the packet tests' inputs into {}",
            corpus.display()
        );
        run(cargo()
            .args(["test", "-p", "xlb-tests", "--test", "packet"])
            .env("XLB_PACKET_CORPUS", &corpus)
            .env_remove("AYA_BUILD_SKIP"))
        .context("running the packet tests for their inputs")?;
    }
    let mut cmd = cargo();
    cmd.args([
        "run",
        "--release",
        "-p",
        "xlb-tests",
        "--bin",
        "xlb-fuzz",
        "--",
    ])
    .arg(format!("--packets={}", args.packets))
    .arg(format!("--seed={}", args.seed))
    .arg("--corpus")
    .arg(&corpus)
    .env_remove("AYA_BUILD_SKIP");
    if args.json {
        cmd.arg("--json");
    }
    run(&mut cmd)
}
