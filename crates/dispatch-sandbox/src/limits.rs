//! Per-lane resource limits, and which mechanism holds each on this host.
//!
//! A limit is held by a cgroup v2 controller where the lanes' parent has it (the whole lane
//! together, every process counted), and by an rlimit otherwise (each process on its own, except
//! `RLIMIT_NPROC`, which counts every process of the lane's user). Nothing is left unbounded
//! silently: [`Limits::report`] says, limit by limit, what holds it here.

use crate::cgroup::Controllers;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open files per process.
    pub nofile: u64,
    /// Largest file a lane may write, in bytes.
    pub fsize: u64,
    /// Processes (and threads) in the lane at once.
    pub processes: u64,
    /// Memory of the whole lane, in bytes (`memory.max`), or of each process (`RLIMIT_DATA`).
    pub memory_bytes: u64,
    /// Swap the lane may use, in bytes (`memory.swap.max`).
    pub swap_bytes: u64,
    /// CPU time of the whole lane (with a cgroup), or of each process (`RLIMIT_CPU`).
    pub cpu_seconds: u64,
    /// CPU bandwidth, in percent of one CPU (`cpu.max`); unset leaves the rate unbounded.
    pub cpu_percent: Option<u32>,
    /// Address space of each process (`RLIMIT_AS`), if set: breaks programs that reserve
    /// large virtual ranges (JITs), so off by default.
    pub address_space: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nofile: 1024,
            fsize: 1 << 30,
            processes: 256,
            memory_bytes: 2 << 30,
            swap_bytes: 0,
            cpu_seconds: 3600,
            cpu_percent: Some(100),
            address_space: None,
        }
    }
}

/// One limit, its value, and what enforces it here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitReport {
    pub limit: String,
    pub value: String,
    pub mechanism: String,
}

pub(crate) type Rlimit = (libc::__rlimit_resource_t, u64);

impl Limits {
    /// Refuse values that would make every lane fail, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let checks = [
            ("processes", self.processes >= 1),
            ("memory_bytes", self.memory_bytes >= 16 << 20),
            ("cpu_seconds", self.cpu_seconds >= 1),
            ("nofile", self.nofile >= 16),
            ("cpu_percent", self.cpu_percent.is_none_or(|p| p >= 1)),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            None => Ok(()),
            Some((name, _)) => Err(format!(
                "sandbox.limits.{name} is too small to run anything (processes ≥ 1, \
                 memory_bytes ≥ 16 MiB, cpu_seconds ≥ 1, nofile ≥ 16, cpu_percent ≥ 1)"
            )),
        }
    }

    /// The rlimits a lane's first process sets (inherited by everything it starts). `same_uid`:
    /// the lane keeps the helper's own uid (unprivileged mode), whose processes
    /// `RLIMIT_NPROC` would count across the user's whole session, so it is not set then.
    pub(crate) fn rlimits(&self, cgroup: Option<Controllers>, same_uid: bool) -> Vec<Rlimit> {
        let controllers = cgroup.unwrap_or_default();
        let mut rlimits = vec![
            (libc::RLIMIT_CORE, 0),
            (libc::RLIMIT_NOFILE, self.nofile),
            (libc::RLIMIT_FSIZE, self.fsize),
            // Always, as a backstop per process: with a cgroup the helper also counts the lane's total.
            (libc::RLIMIT_CPU, self.cpu_seconds),
        ];
        if !controllers.pids && !same_uid {
            rlimits.push((libc::RLIMIT_NPROC, self.processes));
        }
        if !controllers.memory {
            rlimits.push((libc::RLIMIT_DATA, self.memory_bytes));
        }
        if let Some(bytes) = self.address_space {
            rlimits.push((libc::RLIMIT_AS, bytes));
        }
        rlimits
    }

    /// The files a lane's cgroup gets, for the controllers it has.
    pub(crate) fn cgroup_values(&self, controllers: Controllers) -> Vec<(&'static str, String)> {
        let mut values = Vec::new();
        if controllers.pids {
            values.push(("pids.max", self.processes.to_string()));
        }
        if controllers.memory {
            values.push(("memory.max", self.memory_bytes.to_string()));
            values.push(("memory.swap.max", self.swap_bytes.to_string()));
            // Without this the kernel may kill one process and leave the rest running.
            values.push(("memory.oom.group", "1".to_owned()));
        }
        if let (true, Some(percent)) = (controllers.cpu, self.cpu_percent) {
            values.push(("cpu.max", format!("{} 100000", u64::from(percent) * 1000)));
        }
        values
    }

    /// What holds each limit, given the lanes' cgroup controllers (`None`: no cgroup) and
    /// whether lanes keep the helper's uid (see [`Limits::rlimits`]).
    pub fn report(&self, cgroup: Option<Controllers>, same_uid: bool) -> Vec<LimitReport> {
        let c = cgroup.unwrap_or_default();
        let pick = |held: bool, cgroup: &'static str, fallback: &'static str| {
            if held { cgroup } else { fallback }
        };
        let cpu_rate = self
            .cpu_percent
            .map_or("unbounded".to_owned(), |p| format!("{p}% of one CPU"));
        vec![
            held_by(
                "processes",
                self.processes.to_string(),
                processes_held_by(c, same_uid),
            ),
            held_by(
                "memory",
                bytes(self.memory_bytes),
                pick(
                    c.memory,
                    "cgroup memory.max (the whole lane; the lane is killed at the limit)",
                    "RLIMIT_DATA (each process; an allocation past it fails)",
                ),
            ),
            held_by("swap", bytes(self.swap_bytes), swap_held_by(c)),
            held_by(
                "cpu_time",
                format!("{} s", self.cpu_seconds),
                pick(
                    cgroup.is_some(),
                    "cgroup cpu.stat (the whole lane, enforced by the helper) and RLIMIT_CPU (each process)",
                    "RLIMIT_CPU (each process)",
                ),
            ),
            held_by("cpu_rate", cpu_rate, cpu_rate_held_by(c, self.cpu_percent)),
            held_by(
                "open_files",
                self.nofile.to_string(),
                "RLIMIT_NOFILE (each process)",
            ),
            held_by("file_size", bytes(self.fsize), "RLIMIT_FSIZE (each file)"),
        ]
    }
}

fn held_by(limit: &str, value: String, mechanism: &str) -> LimitReport {
    LimitReport {
        limit: limit.to_owned(),
        value,
        mechanism: mechanism.to_owned(),
    }
}

fn processes_held_by(c: Controllers, same_uid: bool) -> &'static str {
    match (c.pids, same_uid) {
        (true, _) => "cgroup pids.max (the whole lane)",
        (false, false) => {
            "RLIMIT_NPROC (counts every process of the lane's user, across its lanes)"
        }
        (false, true) => {
            "not enforced: no pids controller, and RLIMIT_NPROC would count every process of \
             the helper's own user"
        }
    }
}

fn swap_held_by(c: Controllers) -> &'static str {
    match (c.memory, c.swap) {
        (true, true) => "cgroup memory.swap.max",
        (true, false) => "not limited: this kernel accounts no swap",
        (false, _) => {
            "RLIMIT_DATA (swapped-out data still counts against each process's memory limit)"
        }
    }
}

fn cpu_rate_held_by(c: Controllers, percent: Option<u32>) -> &'static str {
    match (c.cpu, percent) {
        (_, None) => "none (not configured)",
        (true, Some(_)) => "cgroup cpu.max",
        (false, Some(_)) => "none: no cpu controller here (cpu_time still bounds the total)",
    }
}

/// `1536 MiB`-style figure for a byte count.
pub fn bytes(value: u64) -> String {
    const MIB: u64 = 1 << 20;
    if value >= MIB && value.is_multiple_of(MIB) {
        format!("{} MiB", value / MIB)
    } else {
        format!("{value} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_controller_falls_back_to_an_rlimit_and_says_so() {
        let limits = Limits::default();
        let none = limits.rlimits(None, false);
        let own_user = limits.rlimits(None, true);
        assert!(!own_user.iter().any(|(r, _)| *r == libc::RLIMIT_NPROC));
        for resource in [libc::RLIMIT_NPROC, libc::RLIMIT_DATA, libc::RLIMIT_CPU] {
            assert!(none.iter().any(|(r, _)| *r == resource), "{resource}");
        }
        assert!(limits.cgroup_values(Controllers::default()).is_empty());
        let all = Controllers {
            pids: true,
            memory: true,
            swap: true,
            cpu: true,
        };
        let full = limits.rlimits(Some(all), false);
        assert!(!full.iter().any(|(r, _)| *r == libc::RLIMIT_NPROC));
        assert!(!full.iter().any(|(r, _)| *r == libc::RLIMIT_DATA));
        let files: Vec<&str> = limits.cgroup_values(all).iter().map(|(f, _)| *f).collect();
        assert!(files.contains(&"pids.max") && files.contains(&"memory.max"));
        assert!(files.contains(&"cpu.max"));

        let report = limits.report(None, false);
        let processes = report.iter().find(|r| r.limit == "processes").unwrap();
        assert!(processes.mechanism.contains("RLIMIT_NPROC"));
        let report = limits.report(None, true);
        let processes = report.iter().find(|r| r.limit == "processes").unwrap();
        assert!(
            processes.mechanism.starts_with("not enforced"),
            "{processes:?}"
        );
        let report = limits.report(Some(all), false);
        let memory = report.iter().find(|r| r.limit == "memory").unwrap();
        assert!(memory.mechanism.contains("memory.max"), "{memory:?}");
        assert_eq!(memory.value, "2048 MiB");
    }

    #[test]
    fn limits_too_small_to_run_anything_are_refused_by_name() {
        let zero = Limits {
            processes: 0,
            ..Limits::default()
        };
        assert!(zero.validate().unwrap_err().contains("processes"));
        let tiny = Limits {
            memory_bytes: 1024,
            ..Limits::default()
        };
        assert!(tiny.validate().unwrap_err().contains("memory_bytes"));
        assert!(Limits::default().validate().is_ok());
    }
}
