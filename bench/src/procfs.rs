//! Memory and CPU of a process, read from `/proc/<pid>/status` and
//! `/proc/<pid>/stat` (Linux only; other systems get zeros).

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

/// Samples the CPU time of some processes at the start of a window.
pub struct CpuWindow {
    start: Instant,
    procs: Vec<(String, u32, u64)>,
}

impl CpuWindow {
    pub fn start(procs: &[(String, u32)]) -> Self {
        let procs = procs.iter().map(|(n, p)| (n.clone(), *p, cpu_ticks(*p))).collect();
        Self { start: Instant::now(), procs }
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
    }
}
