//! Memory and CPU of a process, read from `/proc/<pid>/status` and
//! `/proc/<pid>/stat`, and CPU of the whole machine, from `/proc/stat`
//! (Linux only; other systems get zeros and no machine figure).

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Memory of a process in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Resident set (`VmRSS`).
    pub rss_kib: u64,
    /// Anonymous resident memory (`RssAnon`): heap and stacks, the part a
    /// connection's buffers live in.
    pub anon_kib: u64,
}

pub fn memory(pid: u32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    parse_status(&text)
}

fn parse_status(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss_kib: field("VmRSS:"), anon_kib: field("RssAnon:") }
}

/// CPU time (user + system) of a process in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    parse_stat_ticks(&text)
}

fn parse_stat_ticks(text: &str) -> u64 {
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after the last ')'. utime and stime are fields 14 and 15.
    let Some((_, rest)) = text.rsplit_once(')') else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux in practice).
pub fn ticks_per_sec() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU use of one process over a measured window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcCpu {
    pub name: String,
    pub pid: u32,
    /// 100 = one core busy for the whole window.
    pub cpu_pct: f64,
    pub rss_kib: u64,
}

/// CPU use of the whole machine over a measured window: every process
/// (the load generator too) and the kernel's interrupt work.
///
/// Why beside [`ProcCpu`]: it counts whatever kept the cores busy, also
/// outside the measured processes (interrupt work on idle cores, kernel
/// threads, anything else running), so it tells how close to saturation
/// the machine was, which the processes' figures alone do not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineCpu {
    pub cores: u32,
    /// Not idle (user, system, interrupts). 100 = one core busy, as in
    /// [`ProcCpu::cpu_pct`], so at most 100 × `cores`.
    pub busy_pct: f64,
    /// The part of `busy_pct` spent in hard and soft interrupts (on
    /// loopback, much of the TCP processing). What ran in a measured
    /// process's context is in its figure too.
    pub irq_pct: f64,
    /// Time the hypervisor ran something else while this machine had work.
    pub steal_pct: f64,
}

impl MachineCpu {
    /// `busy 185% of 200% (irq 27%, steal 1%)`.
    pub fn line(&self) -> String {
        format!(
            "busy {:.0}% of {}% (irq {:.0}%, steal {:.0}%)",
            self.busy_pct,
            self.cores * 100,
            self.irq_pct,
            self.steal_pct
        )
    }
}

/// The machine's CPU time so far, in clock ticks summed over its cores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct MachineTicks {
    cores: u32,
    busy: u64,
    irq: u64,
    steal: u64,
    total: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_proc_stat(text: &str) -> Option<MachineTicks> {
    // cpu  user nice system idle iowait irq softirq steal guest guest_nice
    // (guest time is already counted in user).
    let mut lines = text.lines();
    let all: Vec<u64> = lines
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = all[..] else { return None };
    let cores = lines.filter(|l| l.starts_with("cpu")).count() as u32;
    Some(MachineTicks {
        cores: cores.max(1),
        busy: user + nice + system + irq + softirq,
        irq: irq + softirq,
        steal,
        total: user + nice + system + idle + iowait + irq + softirq + steal,
    })
}

impl MachineTicks {
    /// What the machine did between `self` and `later`.
    fn until(&self, later: &MachineTicks) -> MachineCpu {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let share = |now: u64, then: u64| {
            (now.saturating_sub(then) as f64 / total * 100.0 * f64::from(later.cores) * 10.0).round() / 10.0
        };
        MachineCpu {
            cores: later.cores,
            busy_pct: share(later.busy, self.busy),
            irq_pct: share(later.irq, self.irq),
            steal_pct: share(later.steal, self.steal),
        }
    }
}

/// Samples the CPU time of some processes, and of the machine, at the
/// start of a window.
pub struct CpuWindow {
    start: Instant,
    procs: Vec<(String, u32, u64)>,
    machine: Option<MachineTicks>,
}

impl CpuWindow {
    pub fn start(procs: &[(String, u32)]) -> Self {
        let procs = procs.iter().map(|(n, p)| (n.clone(), *p, cpu_ticks(*p))).collect();
        Self { start: Instant::now(), procs, machine: machine_ticks() }
    }

    /// CPU use of the whole machine since [`CpuWindow::start`].
    pub fn machine(&self) -> Option<MachineCpu> {
        Some(self.machine?.until(&machine_ticks()?))
    }

    /// CPU % and RSS of each process since [`CpuWindow::start`].
    pub fn finish(&self) -> Vec<ProcCpu> {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        self.procs
            .iter()
            .map(|(name, pid, before)| {
                let used = cpu_ticks(*pid).saturating_sub(*before) as f64 / ticks_per_sec();
                ProcCpu {
                    name: name.clone(),
                    pid: *pid,
                    cpu_pct: (used / secs * 1000.0).round() / 10.0,
                    rss_kib: memory(*pid).rss_kib,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status =
            "Name:\ttern\nVmHWM:\t  9000 kB\nVmRSS:\t  8192 kB\nRssAnon:\t  4096 kB\nRssFile:\t 4096 kB\n";
        assert_eq!(parse_status(status), Memory { rss_kib: 8192, anon_kib: 4096 });
        let stat = "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(parse_stat_ticks(stat), 300);
        assert_eq!(parse_stat_ticks("garbage"), 0);
    }

    #[test]
    fn parses_proc_stat_and_shares_the_window() {
        let before = "cpu  100 0 50 800 10 5 20 2 0 0\ncpu0 50 0 25 400 5 2 10 1 0 0\ncpu1 50 0 25 400 5 3 10 1 0 0\nintr 1\n";
        let b = parse_proc_stat(before).expect("parses");
        assert_eq!(b, MachineTicks { cores: 2, busy: 175, irq: 25, steal: 2, total: 987 });
        // 200 ticks later (a second on two cores at 100 ticks/s): 120 busy
        // (30 of them interrupts), 2 stolen, 78 idle.
        let after = "cpu  170 0 70 878 10 10 45 4 0 0\ncpu0 1\ncpu1 1\n";
        let a = parse_proc_stat(after).expect("parses");
        assert_eq!(b.until(&a), MachineCpu { cores: 2, busy_pct: 120.0, irq_pct: 30.0, steal_pct: 2.0 });
        assert_eq!(b.until(&a).line(), "busy 120% of 200% (irq 30%, steal 2%)");
        assert_eq!(parse_proc_stat("intr 1\n"), None);
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None, "too few fields");
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(memory(me).rss_kib > 0);
        let w = CpuWindow::start(&[("self".into(), me)]);
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let r = w.finish();
        assert_eq!(r.len(), 1);
        assert!(r[0].cpu_pct >= 0.0);
        let machine = w.machine().expect("/proc/stat");
        assert!(machine.cores >= 1);
        assert!(machine.busy_pct <= f64::from(machine.cores) * 100.0, "{machine:?}");
    }
}
