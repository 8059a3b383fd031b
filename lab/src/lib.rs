//! The lab: hosts, nodes and pods as network namespaces that xlb's tests, demo and benchmarks
//! create for themselves.
//!
//! Every namespace a lab creates is named `xlb-<pid>-<lab>-<name>`, so two runs never collide
//! and a namespace whose creator is gone is recognisably stale; [`Lab::new`] removes such
//! leftovers first. A lab tears down what it made when it is dropped (also on panic), killing
//! the processes it started inside first. Nothing here touches the host's own namespace: every
//! command runs with `ip -n <ns>` or `ip netns exec <ns>`, and links are only ever created
//! between two lab namespaces.
pub mod cluster;
pub mod echo;
pub mod tomcat6;

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
};

const PREFIX: &str = "xlb-";
/// bpffs, where lab agents pin their datapaths (one directory per agent, named after the lab).
pub const BPFFS: &str = "/sys/fs/bpf";

/// Removes the pin directories of lab `tag` (`/sys/fs/bpf/<tag>-*`): unpinning detaches
/// whatever an agent of that lab attached.
pub fn remove_pins(tag: &str) {
    if let Ok(entries) = std::fs::read_dir(BPFFS) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{tag}-"))
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("`{cmd}` could not be started")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("entering namespace {ns}")]
    Setns {
        ns: String,
        #[source]
        source: io::Error,
    },
    #[error("the lab needs root (it creates network namespaces)")]
    NotRoot,
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// Whether this process runs as root.
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, returning its output, or an error carrying its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            cmd: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn ip<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new("ip").args(args))
}

/// Lab namespaces that exist now.
fn lab_namespaces() -> Result<Vec<String>> {
    let out = ip(["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Removes lab namespaces whose creating process no longer runs (a crashed run's leftovers).
pub fn remove_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in lab_namespaces()? {
        let pid = ns[PREFIX.len()..]
            .split('-')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            delete_netns(&ns);
            removed.push(ns);
        }
    }
    // Cgroups hold no files of ours: rmdir, which fails while a process is inside.
    if let Ok(root) = cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for e in entries.flatten() {
            if pid_of(&e.file_name().to_string_lossy())
                .is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
            {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    for base in [std::env::temp_dir(), PathBuf::from(BPFFS)] {
        if let Ok(entries) = std::fs::read_dir(&base) {
            for e in entries.flatten() {
                let pid = pid_of(&e.file_name().to_string_lossy());
                if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    Ok(removed)
}

/// The creator's pid in a lab name (`xlb-<pid>-…`).
fn pid_of(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hosts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|source| LabError::Io {
        what: "reading /proc/self/mounts",
        source,
    })?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| LabError::Io {
            what: "no cgroup v2 hierarchy is mounted (socket-level load balancing needs one)",
            source: io::ErrorKind::NotFound.into(),
        })
}

/// Makes `cmd`'s process join the cgroup (v2) directory `dir` before it runs.
pub fn in_cgroup(cmd: &mut Command, dir: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(|source| LabError::Io {
            what: "opening a lab cgroup's cgroup.procs",
            source,
        })?;
    // SAFETY: the closure runs in the forked child before exec and only calls write(2), which
    // is async-signal-safe, on a descriptor opened here.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// Everything live labs of this process created, for the signal handler's cleanup.
static LIVE_NAMESPACES: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
static LIVE_PIDS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn live<T: Ord>(m: &'static Mutex<BTreeSet<T>>) -> std::sync::MutexGuard<'static, BTreeSet<T>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes SIGINT and SIGTERM tear down every lab of this process (kill its processes, delete
/// its namespaces and files) before exiting with 130. Call it first thing in `main`, before
/// any thread starts: it blocks the signals in the calling thread (and so in every thread
/// created later) and waits for them on a dedicated thread.
pub fn teardown_on_signal() {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the current thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        set
    };
    thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waiting on the signals blocked above.
        unsafe { libc::sigwait(&raw const set, &raw mut sig) };
        eprintln!("\nlab: interrupted, removing the lab");
        for pid in live(&LIVE_PIDS).iter() {
            // SAFETY: killing processes this process started in its lab.
            unsafe { libc::kill((*pid).cast_signed(), libc::SIGKILL) };
        }
        for ns in live(&LIVE_NAMESPACES).iter() {
            delete_netns(ns);
        }
        let _ = remove_stale_files(std::process::id());
        remove_pins(&format!("{PREFIX}{}", std::process::id()));
        std::process::exit(130);
    });
}

fn remove_stale_files(pid: u32) -> io::Result<()> {
    for e in std::fs::read_dir(std::env::temp_dir())?.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(&format!("{PREFIX}{pid}-"))
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

/// Kills every process inside `ns`, then deletes it. Best effort: used in teardown.
fn delete_netns(ns: &str) {
    if let Ok(out) = ip(["netns", "pids", ns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory-safety preconditions; these pids live in a lab
                // namespace this process (or a dead run of it) created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = ip(["netns", "del", ns]);
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces (and processes in them) that is torn down together.
pub struct Lab {
    tag: String,
    namespaces: Mutex<Vec<String>>,
    children: Mutex<Vec<Child>>,
    cgroups: Mutex<Vec<PathBuf>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Lab {
    /// Starts a lab; `tag` (short, `[a-z0-9]`) names it in namespace names.
    pub fn new(tag: &str) -> Result<Self> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        remove_stale()?;
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            tag: format!("{PREFIX}{}-{seq}{tag}", std::process::id()),
            namespaces: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            cgroups: Mutex::new(Vec::new()),
        })
    }

    /// The cgroup (v2) `name` of this lab, created on first use and removed with the lab: the
    /// processes put in it (see [`in_cgroup`]) get a node's socket-level load balancing.
    pub fn cgroup(&self, name: &str) -> Result<PathBuf> {
        let dir = cgroup2_root()?.join(format!("{}-{name}", self.tag));
        let mut cgroups = locked(&self.cgroups);
        if !cgroups.contains(&dir) {
            std::fs::create_dir(&dir).map_err(|source| LabError::Io {
                what: "creating a lab cgroup",
                source,
            })?;
            cgroups.push(dir.clone());
        }
        Ok(dir)
    }

    /// The lab's name prefix (also the name of its files' directory).
    #[must_use]
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Creates namespace `name` with loopback up.
    pub fn netns(&self, name: &str) -> Result<Netns> {
        let full = format!("{}-{name}", self.tag);
        ip(["netns", "add", &full])?;
        locked(&self.namespaces).push(full.clone());
        live(&LIVE_NAMESPACES).insert(full.clone());
        let ns = Netns { name: full };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Deletes one namespace of this lab now (killing what runs in it).
    pub fn delete_netns(&self, ns: &Netns) {
        locked(&self.namespaces).retain(|n| n != ns.name());
        live(&LIVE_NAMESPACES).remove(ns.name());
        delete_netns(ns.name());
    }

    /// Starts `cmd` (built with [`Netns::command`]); it is killed when the lab ends.
    pub fn spawn(&self, cmd: &mut Command) -> Result<u32> {
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            cmd: describe(cmd),
            source,
        })?;
        let pid = child.id();
        locked(&self.children).push(child);
        live(&LIVE_PIDS).insert(pid);
        Ok(pid)
    }

    /// Kills one process started with [`Lab::spawn`] (SIGKILL) and reaps it.
    pub fn kill(&self, pid: u32) {
        let mut children = locked(&self.children);
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut c = children.swap_remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
        live(&LIVE_PIDS).remove(&pid);
    }

    /// Kills every process started with [`Lab::spawn`].
    pub fn kill_all(&self) {
        let mut children = locked(&self.children);
        for mut c in children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
            live(&LIVE_PIDS).remove(&c.id());
        }
    }

    /// Whether a process started with [`Lab::spawn`] still runs.
    #[must_use]
    pub fn is_running(&self, pid: u32) -> bool {
        let mut children = locked(&self.children);
        children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self
            .children
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            let _ = c.kill();
            let _ = c.wait();
            live(&LIVE_PIDS).remove(&c.id());
        }
        let namespaces = self
            .namespaces
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ns in namespaces.drain(..).rev() {
            delete_netns(&ns);
            live(&LIVE_NAMESPACES).remove(&ns);
        }
        for dir in self
            .cgroups
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
        {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// One network namespace of a lab.
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.arg("-n").arg(&self.name).args(args);
        run(&mut cmd)
    }

    /// A command that runs `program` inside this namespace.
    #[must_use]
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A command that runs `program` in this network namespace but the host's mount
    /// namespace (`ip netns exec` remounts /sys, which hides the host's bpffs; an agent that
    /// pins its datapath must see the real /sys/fs/bpf to find it again after a restart).
    #[must_use]
    pub fn command_host_mounts(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Sets a sysctl inside this namespace (e.g. `net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]))?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace (sockets and BPF calls made
    /// there belong to it) and returns its result.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/var/run/netns/{}", self.name)).map_err(|source| {
            LabError::Setns {
                ns: self.name.clone(),
                source,
            }
        })?;
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only; the fd is open for the call's duration.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(LabError::Setns {
                        ns: self.name.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Creates a veth pair between two lab namespaces: `a_name` in `a`, `b_name` in `b`, both up.
/// When `wire` is set, TX checksum offload is turned off on both ends, so packets carry full
/// checksums as they would on a physical wire.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str, wire: bool) -> Result<()> {
    a.ip([
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])?;
    a.ip(["link", "set", a_name, "up"])?;
    b.ip(["link", "set", b_name, "up"])?;
    if wire {
        run(a.command("ethtool").args(["-K", a_name, "tx", "off"]))?;
        run(b.command("ethtool").args(["-K", b_name, "tx", "off"]))?;
    }
    Ok(())
}
