//! Builds the eBPF datapath (lb-ebpf) for bpfel-unknown-none with the nightly toolchain and
//! leaves it in `OUT_DIR` for `include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it (an empty
//! placeholder is written, so unit tests and clippy run without the eBPF toolchain).
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR not set")?).join("xlb-datapath");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        if !out.exists() {
            fs::write(&out, []).context("writing the datapath placeholder")?;
        }
        return Ok(());
    }
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!(
            "bpf-linker is not installed: run `cargo xtask setup` (or build with AYA_BUILD_SKIP=1)"
        );
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let ebpf_dir = manifest.join("../lb-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path to lb-ebpf")?;
    // aya-build replays the inner cargo's stderr as `cargo:warning` lines; keep only real
    // diagnostics, not its "Compiling ..." progress.
    // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
