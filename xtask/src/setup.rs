//! `cargo xtask setup`: makes this machine able to build and run xlb. Each step checks first
//! and does nothing when its piece is present, so the whole task is quick on a ready machine.
use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::run;

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Kernel needed: tcx attach (6.6).
const MIN_KERNEL: (u32, u32) = (6, 6);

pub fn ensure() -> anyhow::Result<()> {
    if !lb_lab::is_root() {
        bail!("xlb's setup, tests and demo need root (they load eBPF programs); rerun as root");
    }
    check_kernel()?;
    let mut apt = Vec::new();
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        apt.extend(["llvm-22-dev", "libpolly-22-dev"]);
    }
    if !has("ethtool", "--version") {
        apt.push("ethtool");
    }
    // The forwarding benchmark measures kube-proxy's rulesets (only ever inside lab
    // namespaces): iptables brings iptables-legacy-restore, nftables brings nft, conntrack
    // flushes a lab node's connection tracking between runs.
    for (program, package) in [
        ("iptables-legacy-restore", "iptables"),
        ("nft", "nftables"),
        ("conntrack", "conntrack"),
    ] {
        if !has(program, "--version") {
            apt.push(package);
        }
    }
    if !apt.is_empty() {
        apt_install(&apt)?;
    }
    if !has("bpf-linker", "--version") {
        eprintln!("setup: installing bpf-linker (LLVM 22), about a minute");
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker@0.13.0",
                "--no-default-features",
                "--features",
            ])
            .arg("llvm-22")
            .env("LLVM_PREFIX", LLVM_PREFIX))
        .context("installing bpf-linker with cargo")?;
    }
    if !has("kubectl", "--help") {
        eprintln!(
            "setup: warning: kubectl not found; the manifest tests render deploy/ with \
             `kubectl kustomize` and will fail without it (install kubectl: \
             https://kubernetes.io/docs/tasks/tools/)"
        );
    }
    ensure_nightly_rust_src()?;
    mount_bpffs()?;
    Ok(())
}

fn has(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn check_kernel() -> anyhow::Result<()> {
    let release =
        fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel version")?;
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version < MIN_KERNEL {
        bail!(
            "kernel {} is too old: xlb needs Linux >= {}.{} (tcx attach)",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    if !Path::new("/sys/fs/bpf").exists()
        || !Path::new("/proc/sys/net/core/bpf_jit_enable").exists()
    {
        bail!("this kernel lacks BPF support (no /sys/fs/bpf or net.core.bpf_jit_enable)");
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    eprintln!("setup: installing {} with apt", packages.join(" "));
    run(Command::new("apt-get").arg("update").arg("-q"))
        .context("apt-get update failed; packages cannot be installed")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("could not install {}", packages.join(" ")))
}

fn ensure_nightly_rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if !out.status.success() {
        bail!(
            "the nightly Rust toolchain is missing (needed to build the eBPF datapath): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        eprintln!("setup: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("adding rust-src to the nightly toolchain")?;
    }
    Ok(())
}

fn mount_bpffs() -> anyhow::Result<()> {
    if Command::new("mountpoint")
        .args(["-q", "/sys/fs/bpf"])
        .status()?
        .success()
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs on /sys/fs/bpf")
}
