//! One cgroup v2 per lane, under a parent the helper owns.
//!
//! A process group is no boundary: a lane's descendant that calls `setsid` or `setpgid` leaves
//! it, and once its parent exits it is reparented away from the helper. A cgroup is one: every
//! descendant of a process in it stays in it (only someone with write access to another cgroup's
//! `cgroup.procs` can move it out, and lanes have none), and writing `1` to `cgroup.kill` SIGKILLs
//! all of them at once, however they re-parent or re-group themselves.
//!
//! The layout, set up once when the helper starts ([`CgroupTree::establish`]):
//!
//! ```text
//! <base>/                 the helper's own cgroup (systemd Delegate=yes), or a configured one
//! <base>/supervisor/      the helper and its reaper (only when <base> is the helper's own)
//! <base>/lanes/           the parent of every lane; the reaper kills it whole if the helper dies
//! <base>/lanes/lane-N/    one lane: its first process joins before it runs anything
//! ```
//!
//! Making and removing a cgroup costs about a tenth of a bare spawn, so neither happens on a
//! dispatch's path: a janitor thread keeps a few fresh, never-used lane cgroups ready (their
//! `cgroup.procs` already open) and removes ended ones. Each lane gets a fresh one, so its
//! counters start at zero.
//!
//! Controllers (`pids`, `memory`, `cpu`) are enabled for the lanes where the base has them; a
//! limit whose controller is missing falls back to an rlimit (see `limits.rs`).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Where lane cgroups live, as the administrator configures it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CgroupSetting {
    /// The helper's own cgroup, when it has one to itself (systemd's `Delegate=yes`).
    #[default]
    Auto,
    /// A cgroup v2 directory, created if missing; the helper does not move into it.
    Path(PathBuf),
    /// No cgroups: process groups, the subreaper and rlimits only.
    Off,
}

impl serde::Serialize for CgroupSetting {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            CgroupSetting::Auto => serializer.serialize_str("auto"),
            CgroupSetting::Off => serializer.serialize_str("off"),
            CgroupSetting::Path(path) => serializer.serialize_str(&path.display().to_string()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for CgroupSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "auto" => Ok(CgroupSetting::Auto),
            "off" => Ok(CgroupSetting::Off),
            path if path.starts_with('/') && !path.split('/').any(|part| part == "..") => {
                Ok(CgroupSetting::Path(PathBuf::from(path)))
            }
            other => Err(serde::de::Error::custom(format!(
                "cgroup must be \"auto\", \"off\" or an absolute path without '..', not {other:?}"
            ))),
        }
    }
}

/// The controllers lanes get limits from, where the base cgroup offers them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controllers {
    pub pids: bool,
    pub memory: bool,
    /// `memory.swap.max` exists (the kernel accounts swap).
    pub swap: bool,
    pub cpu: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {step} ({path}): {error}")]
pub struct CgroupError {
    pub step: &'static str,
    pub path: String,
    pub error: io::Error,
}

fn at<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |error| CgroupError {
        step,
        path: path.display().to_string(),
        error,
    }
}

/// What [`CgroupTree::establish`] found.
pub enum Established {
    Tree(CgroupTree),
    /// No cgroup can be used; the reason says why and what would give one.
    Unavailable(String),
}

#[derive(Debug)]
pub struct CgroupTree {
    lanes: PathBuf,
    controllers: Controllers,
    spares: Arc<Mutex<Vec<LaneCgroup>>>,
    /// Every lane cgroup handed out and not yet released (emptied), with the uid its lane runs
    /// as: a lane's processes all keep that uid (no capabilities, no_new_privs), so a peer is
    /// looked for only in the cgroups of lanes of its own uid.
    in_use: Mutex<HashMap<PathBuf, libc::uid_t>>,
    janitor: Mutex<mpsc::Sender<Chore>>,
    /// `lanes/`, locked for this helper's lifetime (see [`lock_for_this_helper`]).
    _owner: nix::fcntl::Flock<fs::File>,
}

/// Work for the janitor thread.
enum Chore {
    /// Make fresh lane cgroups until [`SPARES`] are ready.
    Refill,
    /// Remove an ended (empty) lane cgroup.
    Remove(PathBuf),
}

/// Fresh lane cgroups kept ready.
const SPARES: usize = 4;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

impl CgroupTree {
    /// Find or create the lanes' parent, in this order: find the base, move the helper out of
    /// it (auto only), enable the controllers it has, create `lanes/`.
    pub fn establish(setting: &CgroupSetting) -> Result<Established, CgroupError> {
        let base = match setting {
            CgroupSetting::Off => {
                return Ok(Established::Unavailable(
                    "cgroups are turned off in the configuration (sandbox.cgroup = \"off\")".into(),
                ));
            }
            CgroupSetting::Path(path) => {
                // Nothing is created outside a cgroup v2 hierarchy.
                let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
                require_cgroup2(existing)?;
                fs::create_dir_all(path).map_err(at("create the configured cgroup", path))?;
                path.clone()
            }
            CgroupSetting::Auto => match own_delegated_cgroup()? {
                Ok(base) => {
                    let supervisor = base.join("supervisor");
                    make_dir(&supervisor)?;
                    write(&supervisor.join("cgroup.procs"), "0")?;
                    base
                }
                Err(reason) => return Ok(Established::Unavailable(reason)),
            },
        };
        require_cgroup2(&base)?;
        // What lanes get is what `lanes/` passes down, which it can only have from the base.
        enable_controllers(&base)?;
        let lanes = base.join("lanes");
        make_dir(&lanes)?;
        // Root's (or, unprivileged, the user's) alone: nobody else may open it, so nobody else
        // can take the lock below and keep the helper from starting.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&lanes, fs::Permissions::from_mode(0o700))
            .map_err(at("restrict", &lanes))?;
        let controllers = enable_controllers(&lanes)?;
        let owner = lock_for_this_helper(&lanes)?;
        if !lanes.join("cgroup.kill").exists() {
            return Ok(Established::Unavailable(format!(
                "{} has no cgroup.kill (the kernel is older than 5.14)",
                lanes.display()
            )));
        }
        Ok(Established::Tree(CgroupTree::with_janitor(
            lanes,
            controllers,
            owner,
        )))
    }

    fn with_janitor(
        lanes: PathBuf,
        controllers: Controllers,
        owner: nix::fcntl::Flock<fs::File>,
    ) -> CgroupTree {
        let spares = Arc::new(Mutex::new(Vec::new()));
        let (janitor, chores) = mpsc::channel();
        let (dir, ready) = (lanes.clone(), spares.clone());
        // If the thread cannot start, every lane cgroup is made and removed inline instead.
        let _ = std::thread::Builder::new()
            .name("lane-cgroups".into())
            .spawn(move || janitor_loop(&dir, controllers, &ready, &chores));
        CgroupTree {
            lanes,
            controllers,
            spares,
            in_use: Mutex::default(),
            janitor: Mutex::new(janitor),
            _owner: owner,
        }
    }

    fn send(&self, chore: Chore) -> Result<(), Chore> {
        let janitor = self.janitor.lock().unwrap_or_else(|p| p.into_inner());
        janitor.send(chore).map_err(|e| e.0)
    }

    pub fn lanes_dir(&self) -> &Path {
        &self.lanes
    }

    pub fn controllers(&self) -> Controllers {
        self.controllers
    }

    /// Open the parent's `cgroup.kill` for the lane reaper: writing `1` kills every lane.
    pub(crate) fn open_kill_all(&self) -> Result<OwnedFd, CgroupError> {
        let path = self.lanes.join("cgroup.kill");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(at("open", &path))?;
        Ok(OwnedFd::from(file))
    }

    /// Have the janitor make the spares now (after the start-up sweep, which would remove them).
    pub fn prefill(&self) {
        let _ = self.send(Chore::Refill);
    }

    /// A fresh lane cgroup with its limits written, ready for the first process of a lane run
    /// as `uid` to join.
    pub fn create_lane(
        &self,
        values: &[(&str, String)],
        uid: libc::uid_t,
    ) -> Result<LaneCgroup, CgroupError> {
        let spare = self.spares.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let lane = match spare {
            Some(lane) => lane,
            None => new_lane(&self.lanes, self.controllers)?,
        };
        for (file, value) in values {
            let path = lane.dir.join(file);
            // Swap accounting can be compiled out; then there is no swap to limit.
            if *file == "memory.swap.max" && !path.exists() {
                continue;
            }
            if let Err(error) = write(&path, value) {
                self.release(&lane);
                return Err(error);
            }
        }
        // Before any process can join it.
        self.in_use().insert(lane.dir.clone(), uid);
        Ok(lane)
    }

    fn in_use(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, libc::uid_t>> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remove an ended lane's (empty) cgroup and make a fresh spare, off the caller's path when
    /// the janitor runs. Spares are made here rather than when one is taken: making one then
    /// would contend (for the cgroup lock and, on small machines, the CPU) with the very lane
    /// that is joining its cgroup.
    pub fn release(&self, lane: &LaneCgroup) {
        self.in_use().remove(&lane.dir);
        if let Err(Chore::Remove(dir)) = self.send(Chore::Remove(lane.dir.clone())) {
            let _ = fs::remove_dir(dir);
        }
        let _ = self.send(Chore::Refill);
    }

    /// Whether process `pid`, running as `uid`, is in the cgroup of one of the lanes run as
    /// `uid`, at any depth (a lane whose cgroup is its own user's, in unprivileged mode, could
    /// make sub-cgroups). Only those lanes are read, not every lane's: a connection costs what
    /// its own uid runs. Lanes run as the helper's own uid (unprivileged mode) own the
    /// delegated tree and could move a process into a spare or a leftover cgroup, so for that
    /// uid every cgroup under `lanes/` is read. Read from cgroupfs, which `ProtectProc=` does
    /// not hide. Unreadable counts as yes.
    pub fn holds_process(&self, pid: i32, uid: libc::uid_t) -> bool {
        let wanted = pid.to_string();
        if uid == nix::unistd::geteuid().as_raw() {
            return any_holds(&self.lanes, &wanted, 8, true);
        }
        let theirs: Vec<PathBuf> = self
            .in_use()
            .iter()
            .filter(|(_, lane_uid)| **lane_uid == uid)
            .map(|(dir, _)| dir.clone())
            .collect();
        theirs.iter().any(|dir| {
            let here = match fs::read_to_string(dir.join("cgroup.procs")) {
                Ok(procs) => procs.lines().any(|p| p == wanted),
                // Released (emptied) since it was listed: it holds no process now.
                Err(error) if error.kind() == io::ErrorKind::NotFound => return false,
                Err(_) => return true,
            };
            here || any_holds(dir, &wanted, 7, false)
        })
    }

    /// Kill and remove every lane cgroup a previous helper left behind (it died or was killed
    /// with lanes running). Returns the names of those that held processes.
    pub fn sweep(&self) -> Result<Vec<String>, CgroupError> {
        let mut killed = Vec::new();
        let entries = fs::read_dir(&self.lanes).map_err(at("list", &self.lanes))?;
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let lane = LaneCgroup {
                dir: entry.path(),
                procs: None,
                events: None,
                cpu_stat: None,
                controllers: self.controllers,
            };
            if lane.populated().unwrap_or(true) {
                killed.push(entry.file_name().to_string_lossy().into_owned());
            }
            lane.end(Duration::from_secs(5))?;
        }
        Ok(killed)
    }
}

static LANE_NUMBER: AtomicU64 = AtomicU64::new(0);

/// Whether a cgroup below `dir` (down to `depth` more levels) lists `wanted` in its
/// `cgroup.procs`. `top`: `dir` is the lanes' tree itself, so a `dir` that cannot be read rules
/// nothing out; below it, a cgroup gone meanwhile (its lane ended, or the janitor removed a
/// spare) holds no process.
fn any_holds(dir: &Path, wanted: &str, depth: usize, top: bool) -> bool {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if !top && error.kind() == io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    };
    entries.flatten().any(|entry| {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            return false;
        }
        let here = fs::read_to_string(path.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|p| p == wanted));
        here || (depth > 0 && any_holds(&path, wanted, depth - 1, false))
    })
}

/// Make a fresh lane cgroup (`lane-<helper pid>-<n>`) and open its `cgroup.procs`.
fn new_lane(lanes: &Path, controllers: Controllers) -> Result<LaneCgroup, CgroupError> {
    let number = LANE_NUMBER.fetch_add(1, Ordering::Relaxed);
    let dir = lanes.join(format!("lane-{}-{number}", std::process::id()));
    fs::create_dir(&dir).map_err(at("create the lane's cgroup", &dir))?;
    let procs = dir.join("cgroup.procs");
    let opened = (|| {
        let procs = fs::OpenOptions::new().write(true).open(&procs)?;
        Ok::<_, io::Error>((
            procs,
            fs::File::open(dir.join("cgroup.events"))?,
            fs::File::open(dir.join("cpu.stat"))?,
        ))
    })();
    match opened {
        Ok((procs, events, cpu_stat)) => Ok(LaneCgroup {
            dir,
            procs: Some(OwnedFd::from(procs)),
            events: Some(events),
            cpu_stat: Some(cpu_stat),
            controllers,
        }),
        Err(error) => {
            let _ = fs::remove_dir(&dir);
            Err(at("open the files of", &procs)(error))
        }
    }
}

fn janitor_loop(
    lanes: &Path,
    controllers: Controllers,
    spares: &Mutex<Vec<LaneCgroup>>,
    chores: &mpsc::Receiver<Chore>,
) {
    while let Ok(chore) = chores.recv() {
        match chore {
            Chore::Remove(dir) => {
                let _ = fs::remove_dir(dir);
            }
            Chore::Refill => loop {
                if spares.lock().unwrap_or_else(|p| p.into_inner()).len() >= SPARES {
                    break;
                }
                // A failure here only means the next lane makes its own, and reports why.
                let Ok(lane) = new_lane(lanes, controllers) else {
                    break;
                };
                spares.lock().unwrap_or_else(|p| p.into_inner()).push(lane);
            },
        }
    }
}

/// The cgroup of a lane. Ended with [`LaneCgroup::end`]: killed, waited for, removed.
#[derive(Debug)]
pub struct LaneCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for the lane's first process to write itself into.
    procs: Option<OwnedFd>,
    /// `cgroup.events` and `cpu.stat`, opened ahead (off the dispatch's path) and re-read from
    /// offset 0 at the lane's end; `None` for a cgroup found by the start-up sweep.
    events: Option<fs::File>,
    cpu_stat: Option<fs::File>,
    controllers: Controllers,
}

/// What a lane's cgroup counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    /// `memory.peak`, with the memory controller.
    pub memory_peak: Option<u64>,
    /// Times a fork was refused at `pids.max`, with the pids controller.
    pub pids_max_hits: Option<u64>,
    /// Processes the kernel killed at `memory.max`, with the memory controller.
    pub oom_kills: Option<u64>,
}

impl LaneCgroup {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn procs_fd(&self) -> Option<i32> {
        self.procs.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// The join is done (or failed): the helper no longer needs the fd.
    pub(crate) fn close_procs(&mut self) {
        self.procs = None;
    }

    /// SIGKILL every process in the lane, wherever in it they are.
    pub fn kill(&self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.kill"), "1")
    }

    pub fn populated(&self) -> io::Result<bool> {
        let events = reread(self.events.as_ref(), &self.dir.join("cgroup.events"))?;
        Ok(keyed(&events, "populated") != Some(0))
    }

    /// How many tasks (processes and their threads: what `pids.max` and `RLIMIT_NPROC` count)
    /// are in the lane now.
    pub fn task_count(&self) -> io::Result<usize> {
        Ok(fs::read_to_string(self.dir.join("cgroup.threads"))?
            .lines()
            .count())
    }

    pub fn usage(&self) -> CgroupUsage {
        let read = |file: &str| fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let cpu = reread(self.cpu_stat.as_ref(), &self.dir.join("cpu.stat")).unwrap_or_default();
        let memory_peak = self
            .controllers
            .memory
            .then(|| read("memory.peak").trim().parse().ok())
            .flatten();
        CgroupUsage {
            cpu_user_usec: keyed(&cpu, "user_usec").unwrap_or(0),
            cpu_system_usec: keyed(&cpu, "system_usec").unwrap_or(0),
            memory_peak,
            pids_max_hits: self
                .controllers
                .pids
                .then(|| keyed(&read("pids.events"), "max"))
                .flatten(),
            oom_kills: self
                .controllers
                .memory
                .then(|| keyed(&read("memory.events"), "oom_kill"))
                .flatten(),
        }
    }

    /// Kill whatever is left, wait until the cgroup is empty, remove it.
    pub fn end(&self, limit: Duration) -> Result<(), CgroupError> {
        self.kill_and_wait(limit)?;
        self.remove()
    }

    pub fn remove(&self) -> Result<(), CgroupError> {
        fs::remove_dir(&self.dir).map_err(at("remove", &self.dir))
    }

    /// Kill whatever is left and wait until the cgroup is empty. Waits at most `limit` (a
    /// process in uninterruptible sleep dies only when it wakes).
    pub fn kill_and_wait(&self, limit: Duration) -> Result<(), CgroupError> {
        let started = Instant::now();
        while self
            .populated()
            .map_err(at("read cgroup.events", &self.dir))?
        {
            self.kill().map_err(at("write cgroup.kill", &self.dir))?;
            if started.elapsed() > limit {
                return Err(CgroupError {
                    step: "wait until empty",
                    path: self.dir.display().to_string(),
                    error: io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("processes remain after {limit:?}"),
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// A small cgroup file's current contents: from its open file when there is one (a read at
/// offset 0 makes the kernel generate it afresh), else by path.
fn reread(open: Option<&fs::File>, path: &Path) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let Some(file) = open else {
        return fs::read_to_string(path);
    };
    let mut buffer = [0u8; 1024];
    let length = file.read_at(&mut buffer, 0)?;
    Ok(String::from_utf8_lossy(&buffer[..length]).into_owned())
}

/// A `key value` line of a cgroup file (`cgroup.events`, `cpu.stat`, `pids.events`, …).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => {
            Err(at("create", path)(error))
        }
        _ => Ok(()),
    }
}

/// One helper per lanes tree: a second one (another instance on the same configuration) would
/// sweep the first one's running lanes at its start, and its reaper would kill them with it.
fn lock_for_this_helper(lanes: &Path) -> Result<nix::fcntl::Flock<fs::File>, CgroupError> {
    let dir = fs::File::open(lanes).map_err(at("open", lanes))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| at("lock (is another helper using it?)", lanes)(io::Error::from(errno)),
    )
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(at("write", path))
}

fn require_cgroup2(path: &Path) -> Result<(), CgroupError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|e| at("statfs", path)(e.into()))?;
    if stat.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
        return Err(at("check the filesystem", path)(io::Error::other(
            "not a cgroup v2 directory",
        )));
    }
    Ok(())
}

/// Enable, for the children of `dir`, each wanted controller that `dir` has. One at a time:
/// one the kernel refuses must not stop the others.
fn enable_controllers(dir: &Path) -> Result<Controllers, CgroupError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(at("read cgroup.controllers", dir))?;
    let has = |name: &str| available.split_whitespace().any(|c| c == name);
    let control = dir.join("cgroup.subtree_control");
    let enable = |name: &str| has(name) && fs::write(&control, format!("+{name}")).is_ok();
    let memory = enable("memory");
    Ok(Controllers {
        pids: enable("pids"),
        memory,
        swap: memory && dir.join("memory.swap.max").exists(),
        cpu: enable("cpu"),
    })
}

/// What a configured cgroup directory would offer lanes, without creating or changing anything
/// (for `dispatch-helper check`, which may run beside a serving helper).
pub fn inspect(path: &Path) -> Result<Controllers, CgroupError> {
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    require_cgroup2(existing)?;
    let file = existing.join("cgroup.controllers");
    let available = fs::read_to_string(&file).map_err(at("read", &file))?;
    let has = |name: &str| available.split_whitespace().any(|c| c == name);
    Ok(Controllers {
        pids: has("pids"),
        memory: has("memory"),
        swap: has("memory") && existing.join("memory.swap.max").exists(),
        cpu: has("cpu"),
    })
}

/// Where the cgroup v2 hierarchy is mounted (the whole hierarchy, not a bind of part of it).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&mounts)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    // mountinfo: id parent major:minor root mount-point options … - fstype source super-options
    mountinfo.lines().find_map(|line| {
        let (fields, tail) = line.split_once(" - ")?;
        let fields: Vec<&str> = fields.split(' ').collect();
        let point = fields.get(4)?;
        (tail.split(' ').next()? == "cgroup2" && fields.get(3) == Some(&"/"))
            .then(|| PathBuf::from(point))
    })
}

/// The helper's own cgroup v2 directory, if it has it to itself: not the root (that is nobody's
/// to hand out), and no other process in it (systemd starts a `Delegate=yes` service alone in
/// its cgroup; a helper started by an MCP front shares the front's). `Err` gives the reason.
fn own_delegated_cgroup() -> Result<Result<PathBuf, String>, CgroupError> {
    let proc_cgroup = Path::new("/proc/self/cgroup");
    let own = fs::read_to_string(proc_cgroup).map_err(at("read", proc_cgroup))?;
    let mountinfo = Path::new("/proc/self/mountinfo");
    let mounts = fs::read_to_string(mountinfo).map_err(at("read", mountinfo))?;
    Ok(delegated_cgroup(&own, &mounts, |dir| {
        let procs = fs::read_to_string(dir.join("cgroup.procs"))?;
        let me = std::process::id().to_string();
        let writable = nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_ok();
        Ok(writable && procs.lines().all(|pid| pid == me))
    }))
}

/// The decision of [`own_delegated_cgroup`] on the contents of `/proc/self/cgroup` and
/// `/proc/self/mountinfo`; `alone_and_writable` looks at the candidate directory.
fn delegated_cgroup(
    proc_cgroup: &str,
    mountinfo: &str,
    alone_and_writable: impl Fn(&Path) -> io::Result<bool>,
) -> Result<PathBuf, String> {
    let Some(own) = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Err("the helper is in no cgroup v2 hierarchy".into());
    };
    let Some(mount) = cgroup2_mount_in(mountinfo) else {
        return Err("no cgroup v2 filesystem is mounted".into());
    };
    if own == "/" {
        return Err(format!(
            "the helper runs in the root of the cgroup v2 hierarchy ({}), which is not delegated \
             to it: run it under systemd with Delegate=yes, or set sandbox.cgroup",
            mount.display()
        ));
    }
    let dir = mount.join(own.trim_start_matches('/'));
    match alone_and_writable(&dir) {
        Ok(true) => Ok(dir),
        Ok(false) => Err(format!(
            "the helper's cgroup {} is shared with other processes or not writable, so it is not \
             delegated to the helper: run it under systemd with Delegate=yes, or set sandbox.cgroup",
            dir.display()
        )),
        Err(error) => Err(format!("cannot read {}: {error}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn only_a_cgroup_the_helper_has_to_itself_is_used() {
        let own = "1:cpu:/\n0::/system.slice/dispatch-helper.service\n";
        let found = delegated_cgroup(own, MOUNTS, |_| Ok(true)).unwrap();
        assert_eq!(
            found,
            Path::new("/sys/fs/cgroup/unified/system.slice/dispatch-helper.service")
        );
        let shared = delegated_cgroup(own, MOUNTS, |_| Ok(false)).unwrap_err();
        assert!(shared.contains("Delegate=yes"), "{shared}");
        let root = delegated_cgroup("0::/\n", MOUNTS, |_| Ok(true)).unwrap_err();
        assert!(root.contains("root of the cgroup v2 hierarchy"), "{root}");
        let v1_only = delegated_cgroup("1:cpu:/x\n", MOUNTS, |_| Ok(true)).unwrap_err();
        assert!(v1_only.contains("no cgroup v2"), "{v1_only}");
        let unmounted = delegated_cgroup(own, "", |_| Ok(true)).unwrap_err();
        assert!(unmounted.contains("mounted"), "{unmounted}");
    }

    #[test]
    fn keyed_files_are_read_by_key() {
        let stat = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(keyed(stat, "user_usec"), Some(1000));
        assert_eq!(keyed(stat, "usage"), None);
        assert_eq!(keyed("populated 0\nfrozen 0\n", "populated"), Some(0));
    }

    #[test]
    fn settings_parse_and_refuse_relative_or_escaping_paths() {
        use serde::Deserialize;
        use serde::de::IntoDeserializer;
        let parse = |text: &str| {
            let input: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
                text.into_deserializer();
            CgroupSetting::deserialize(input)
        };
        assert_eq!(parse("auto").unwrap(), CgroupSetting::Auto);
        assert_eq!(parse("off").unwrap(), CgroupSetting::Off);
        assert_eq!(
            parse("/sys/fs/cgroup/x").unwrap(),
            CgroupSetting::Path("/sys/fs/cgroup/x".into())
        );
        assert!(parse("relative").is_err());
        assert!(parse("/sys/fs/cgroup/../etc").is_err());
    }
}
