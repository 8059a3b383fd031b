//! Where a running datapath lives in bpffs. The agent pins every map as
//! `<pin dir>/<map name>` (names carry the layout version, `xlb_frontends_v1`, ...) and every
//! attachment link under `<pin dir>/links/`, so a restarted agent adopts them and the
//! inspection CLI can read the maps with or without an agent running.
use std::path::{Path, PathBuf};

/// Default pin directory (mode 0700).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xlb";

/// Path of map `name` under `dir`.
#[must_use]
pub fn map_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Directory of pinned links under `dir`.
#[must_use]
pub fn links_dir(dir: &Path) -> PathBuf {
    dir.join("links")
}

/// The mark `xlb cleanup` leaves beside `dir` (an empty bpffs directory, `<dir>-cleaned-up`):
/// a running agent that finds its pins gone repairs them, unless this says an operator
/// removed them on purpose. The next agent to start removes it.
#[must_use]
pub fn cleanup_mark(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push("-cleaned-up");
    dir.with_file_name(name)
}
