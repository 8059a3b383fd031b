//! `cargo xtask test`: the whole suite, in stages, each with a summary line. Stops at the first
//! failing stage. `.ci/run` calls exactly this.
use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{cargo, setup};

struct Stage {
    name: &'static str,
    args: &'static [&'static str],
    /// Build without the eBPF toolchain (`AYA_BUILD_SKIP=1`): lint and unit stages.
    skip_ebpf: bool,
    /// The stage runs tests whose `test result:` lines are summed.
    tests: bool,
}

const STAGES: &[Stage] = &[
    Stage {
        name: "fmt",
        args: &["fmt", "--all", "--check"],
        skip_ebpf: true,
        tests: false,
    },
    Stage {
        name: "clippy",
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        skip_ebpf: true,
        tests: false,
    },
    Stage {
        name: "unit",
        args: &[
            "test",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--exclude",
            "xlb-tests",
        ],
        skip_ebpf: true,
        tests: true,
    },
    Stage {
        name: "ebpf-build",
        args: &[
            "build",
            "-p",
            "lb-userspace",
            "--bin",
            "xlb",
            "-p",
            "lb-lab",
            "--bin",
            "xlb-echo",
        ],
        skip_ebpf: false,
        tests: false,
    },
    Stage {
        name: "packet",
        args: &["test", "-p", "xlb-tests", "--lib", "--test", "packet"],
        skip_ebpf: false,
        tests: true,
    },
    // The packet fuzzer over the packet stage's inputs (kept in XLB_PACKET_CORPUS) and
    // generated frames; `cargo xtask fuzz` runs it longer.
    Stage {
        name: "fuzz",
        args: &[
            "run",
            "-p",
            "xlb-tests",
            "--bin",
            "xlb-fuzz",
            "--",
            "--packets=10000",
        ],
        skip_ebpf: false,
        tests: false,
    },
    Stage {
        name: "cli",
        args: &["test", "-p", "xlb-tests", "--test", "cli"],
        skip_ebpf: false,
        tests: true,
    },
    Stage {
        name: "lab",
        args: &[
            "test",
            "-p",
            "xlb-tests",
            "--test",
            "lab",
            "--",
            "--test-threads=2",
        ],
        skip_ebpf: false,
        tests: true,
    },
];

/// The previous release: the last commit of map layout version 1. The lab test
/// `upgrade_from_the_previous_release_keeps_snat_flows` upgrades from its `xlb`.
const PREVIOUS_RELEASE: &str = "40d656394fa295dfb57a1cb39b9718b4b57b6551";

/// Builds the previous release's `xlb` (debug) from git into `<target dir>/previous-release`, once
/// per commit; returns its path, or None where this checkout has no such commit (a shallow
/// or exported tree), which is said.
fn build_previous_release() -> anyhow::Result<Option<std::path::PathBuf>> {
    let root = crate::root();
    let dir = crate::target_dir().join("previous-release");
    let src = dir.join("src");
    let bin = dir.join("target/debug/xlb");
    let stamp = dir.join("commit");
    if bin.exists() && std::fs::read_to_string(&stamp).is_ok_and(|c| c == PREVIOUS_RELEASE) {
        return Ok(Some(bin));
    }
    let has_commit = std::process::Command::new("git")
        .args(["-C"])
        .arg(&root)
        .args(["cat-file", "-e", &format!("{PREVIOUS_RELEASE}^{{commit}}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has_commit {
        eprintln!(
            "xtask: commit {PREVIOUS_RELEASE} (the previous release) is not in this checkout: \
             the upgrade-from-the-previous-release lab test is skipped"
        );
        return Ok(None);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&src)?;
    let mut archive = std::process::Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .stdout(Stdio::piped())
        .spawn()
        .context("git archive")?;
    let out = archive.stdout.take().context("git archive output")?;
    let untar = std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(out)
        .status()
        .context("tar")?;
    let archived = archive.wait().context("git archive")?;
    if !untar.success() || !archived.success() {
        bail!("unpacking the previous release failed: git archive {archived}, tar {untar}");
    }
    crate::run(
        cargo()
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env_remove("AYA_BUILD_SKIP")
            .args(["build", "-p", "lb-userspace", "--bin", "xlb"]),
    )?;
    std::fs::write(&stamp, PREVIOUS_RELEASE)?;
    Ok(Some(bin))
}

pub fn run() -> anyhow::Result<()> {
    setup::ensure()?;
    let started = Instant::now();
    let mut summary = Vec::new();
    for stage in STAGES {
        if stage.name == "lab" {
            eprintln!("\n==> stage previous-release: build {PREVIOUS_RELEASE}");
            let t = Instant::now();
            let previous = build_previous_release();
            let secs = t.elapsed().as_secs_f64();
            let line = match &previous {
                Ok(Some(_)) => format!("{:<11} ok ({secs:.0} s)", "previous"),
                Ok(None) => format!("{:<11} skipped: no such commit ({secs:.0} s)", "previous"),
                Err(e) => format!("{:<11} FAILED ({secs:.0} s): {e:#}", "previous"),
            };
            eprintln!("==> {line}");
            summary.push(line);
            match previous {
                // SAFETY: xtask runs one thread; the lab stage's cargo inherits the variable.
                Ok(Some(bin)) => unsafe { std::env::set_var("XLB_PREVIOUS_BIN", bin) },
                Ok(None) => {}
                Err(_) => {
                    print_summary(&summary, started);
                    bail!("stage previous-release failed");
                }
            }
        }
        eprintln!("\n==> stage {}: cargo {}", stage.name, stage.args.join(" "));
        let t = Instant::now();
        let result = run_stage(stage);
        let secs = t.elapsed().as_secs_f64();
        let line = match &result {
            Ok(Some((p, f))) => format!("{:<11} {p} passed, {f} failed ({secs:.0} s)", stage.name),
            Ok(None) => format!("{:<11} ok ({secs:.0} s)", stage.name),
            Err(e) => format!("{:<11} FAILED ({secs:.0} s): {e:#}", stage.name),
        };
        eprintln!("==> {line}");
        summary.push(line);
        if result.is_err() {
            print_summary(&summary, started);
            bail!("stage {} failed", stage.name);
        }
    }
    print_summary(&summary, started);
    Ok(())
}

fn print_summary(lines: &[String], started: Instant) {
    eprintln!("\n==> summary ({:.0} s)", started.elapsed().as_secs_f64());
    for l in lines {
        eprintln!("    {l}");
    }
}

/// Runs one stage; for test stages returns (passed, failed) summed over cargo's result lines.
fn run_stage(stage: &Stage) -> anyhow::Result<Option<(u64, u64)>> {
    let mut cmd = cargo();
    cmd.args(stage.args)
        .stdout(Stdio::piped())
        .env("XLB_PACKET_CORPUS", crate::fuzz::corpus_dir());
    if stage.skip_ebpf {
        cmd.env("AYA_BUILD_SKIP", "1");
    } else {
        cmd.env_remove("AYA_BUILD_SKIP");
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cargo exited with {status}; {passed} passed, {failed} failed");
    }
    Ok(stage.tests.then_some((passed, failed)))
}

/// Parses `test result: ok. 12 passed; 0 failed; ...`.
fn parse_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |what: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(what)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::parse_result;

    #[test]
    fn parses_cargo_result_lines() {
        assert_eq!(
            parse_result(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.04s"
            ),
            Some((12, 0))
        );
        assert_eq!(
            parse_result(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some((3, 2))
        );
        assert_eq!(parse_result("running 4 tests"), None);
    }
}
