//! Shared helpers of xlb's packet tests and lab tests: privilege checks, a packet builder with
//! real checksums, a checksum verifier, and a harness around `BPF_PROG_TEST_RUN`.
pub mod capture;
pub mod fuzz;
pub mod harness;
pub mod node;
pub mod packet;

/// A binary of this workspace's build (`xlb`, `xlb-echo`): next to the running test's own
/// executable (`<target dir>/<profile>/deps/<test>`), so a `CARGO_TARGET_DIR` elsewhere works.
#[must_use]
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let deps = exe.parent().unwrap_or(std::path::Path::new("."));
    deps.parent().unwrap_or(deps).join(name)
}

/// Whether this test can use BPF and namespaces. Without root it is skipped with a note, except
/// under `CI=true`, where a test that cannot run is a failure.
#[must_use]
pub fn privileged(test: &str) -> bool {
    if lb_lab::is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (BPF, network namespaces) and CI=true forbids skipping it"
    );
    eprintln!("skipping {test}: needs root");
    false
}
