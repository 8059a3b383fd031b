//! Project tasks: `cargo xtask setup | build | test | demo | bench | fuzz`.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so it runs on a fresh machine and
//! installs that toolchain itself (`setup`, run automatically by the other tasks).
mod bench;
mod demo;
mod fuzz;
mod setup;
mod test;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and running xlb needs (idempotent, quick when all is present).
    Setup,
    /// Build the xlb binary (release) with its embedded datapath.
    Build,
    /// The whole test suite: fmt, clippy, unit, eBPF build, packet tests, the packet fuzzer,
    /// CLI tests, lab tests.
    Test,
    /// Run xlb's main job on its built-in example.
    Demo,
    /// Benchmarks: `datapath` (ns per packet), `forward` (packets/s vs kube-proxy),
    /// `control-plane` (sync time, memory); all three and the report when none is named.
    Bench(bench::BenchArgs),
    /// The packet fuzzer: mutated frames through every datapath program, judged by an oracle
    /// (exits non-zero on a violation).
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::ensure(),
        Task::Build => setup::ensure().and_then(|()| build_release()),
        Task::Test => test::run(),
        Task::Demo => demo::run_demo(),
        Task::Bench(args) => bench::run_bench(&args),
        Task::Fuzz(args) => fuzz::run_fuzz(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace, as cargo reads
/// it), else `target/` in the workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs `cmd`, failing with its description when it does not exit 0.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds `<target dir>/release/xlb`.
fn build_release() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "-p", "lb-userspace", "--bin", "xlb"]))
}
