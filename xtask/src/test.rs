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
        args: &["test", "-p", "xlb-tests", "--test", "packet"],
        skip_ebpf: false,
        tests: true,
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

pub fn run() -> anyhow::Result<()> {
    setup::ensure()?;
    let started = Instant::now();
    let mut summary = Vec::new();
    for stage in STAGES {
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
    cmd.args(stage.args).stdout(Stdio::piped());
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
