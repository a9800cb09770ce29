//! The result file (`results.json`) and `BENCHMARKS.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::flow::RateRun;
use crate::ids::IdsResult;
use crate::stats::fmt_ms;
use crate::storm::{IdlePoint, Ramp};

pub const SCHEMA: &str = "tern-bench/1";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub mem_total_kib: u64,
    pub kernel: String,
    pub open_files_limit: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
                })
                .unwrap_or_default(),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            mem_total_kib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            open_files_limit: std::fs::read_to_string("/proc/self/limits")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().skip(3).take(2).collect::<Vec<_>>().join(" / "))
                .unwrap_or_default(),
        }
    }
}

/// S2 outcome on one target.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StormRow {
    pub target: String,
    pub tls: bool,
    pub ramp: Ramp,
}

/// Highest sustainable rate found by a search.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MaxRate {
    pub scenario: String,
    pub system: String,
    pub target: String,
    /// Members per group (S4), 0 for 1:1.
    pub group_size: u32,
    /// Messages/s (S3) — the highest rate tested that was sustainable.
    pub max_rate: f64,
    /// Deliveries/s at that rate.
    pub max_deliveries_per_s: f64,
    pub slo_ms: f64,
    /// Rates tried, in order.
    pub tried: Vec<f64>,
    /// The search stopped at the configured ceiling, not at a failure.
    pub capped: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub schema: String,
    /// `smoke`, `full` or `custom`.
    pub profile: String,
    pub started_unix_s: u64,
    pub finished_unix_s: u64,
    pub machine: Machine,
    pub versions: BTreeMap<String, String>,
    /// The benchmark's own command line and every server it started.
    pub command_lines: Vec<String>,
    /// The sizes and durations used.
    pub settings: BTreeMap<String, String>,
    pub s1: Vec<IdlePoint>,
    pub s2: Vec<StormRow>,
    pub s3: Vec<RateRun>,
    pub s3_max: Vec<MaxRate>,
    pub s4: Vec<RateRun>,
    pub s4_max: Vec<MaxRate>,
    pub s5: Vec<IdsResult>,
    /// What was not run, and why.
    pub skipped: Vec<String>,
    /// Written by people, not by the tool: what a target's figure means,
    /// the profile that shows where the time goes when one is missed,
    /// rows measured apart from the run. Rendered under the targets.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Results {
    pub fn new(profile: &str) -> Results {
        Results {
            schema: SCHEMA.into(),
            profile: profile.into(),
            started_unix_s: unix_now(),
            ..Results::default()
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// `tern standalone 117%, tern-bench 45%; machine busy 185% of 200% (irq 27%, steal 0%)`.
pub fn cpu_cell(cpu: &[crate::procfs::ProcCpu], machine: Option<&crate::procfs::MachineCpu>) -> String {
    let procs = cpu.iter().map(|c| format!("{} {:.0}%", c.name, c.cpu_pct)).collect::<Vec<_>>().join(", ");
    match machine {
        Some(m) => format!("{procs}; machine {}", m.line()),
        None => procs,
    }
}

/// Target rows: what the issue asks, what this run reached.
fn targets(r: &Results) -> Vec<[String; 4]> {
    let mut rows = Vec::new();
    let status = |ok: Option<bool>| match ok {
        Some(true) => "met".to_owned(),
        Some(false) => "not met".to_owned(),
        None => "not measured".to_owned(),
    };
    let idle =
        r.s1.iter().filter(|p| p.tls && p.target.starts_with("standalone")).max_by_key(|p| p.connections);
    rows.push([
        "idle TLS connection, access-node RSS".into(),
        "≤ 8 KiB/conn".into(),
        idle.map(|p| {
            format!(
                "{:.1} KiB/conn at {} conns (anon {:.1} KiB)",
                p.rss_per_conn_bytes / 1024.0,
                p.connections,
                p.anon_per_conn_bytes / 1024.0
            )
        })
        .unwrap_or_else(|| "–".into()),
        status(idle.map(|p| p.errors == 0 && p.rss_per_conn_bytes <= 8192.0)),
    ]);
    let max_of = |system: &str, target: &str, scenario: &str| {
        r.s3_max
            .iter()
            .chain(r.s4_max.iter())
            .find(|m| m.system == system && m.target == target && m.scenario == scenario)
    };
    let tern = max_of("tern", "standalone-plain", "s3");
    rows.push([
        "standalone 1:1, plaintext".into(),
        "≥ 100,000 msgs/s".into(),
        tern.map(|m| {
            format!("{} msgs/s{}", rate(m.max_rate), if m.capped { " (search ceiling)" } else { "" })
        })
        .unwrap_or_else(|| "–".into()),
        status(tern.map(|m| m.max_rate >= 100_000.0)),
    ]);
    let at70 =
        r.s3.iter().find(|x| x.system == "tern" && x.target == "standalone-plain" && x.label == "at 70%");
    rows.push([
        "p99 at 70% of that rate".into(),
        "≤ 10 ms".into(),
        at70.map(|x| format!("{} ms at {} msgs/s", fmt_ms(x.latency.p99_ms), rate(x.offered_rate)))
            .unwrap_or_else(|| "–".into()),
        // The goal is the p99 at 70% of 100,000 msgs/s: a p99 that holds at
        // 70% of a lower measured rate only says so, it does not meet it.
        match (at70, tern) {
            (Some(x), Some(m)) if x.verdict.ok && x.latency.p99_ms <= 10.0 && m.max_rate < 100_000.0 => {
                "not met (holds at 70% of the measured rate, which is below the goal)".into()
            }
            _ => status(at70.map(|x| x.verdict.ok && x.latency.p99_ms <= 10.0)),
        },
    ]);
    let mosq = max_of("mosquitto", "mosquitto", "s3");
    let ratio = match (tern, mosq) {
        (Some(t), Some(m)) if m.max_rate > 0.0 => Some(t.max_rate / m.max_rate),
        _ => None,
    };
    rows.push([
        "1:1 vs Mosquitto QoS 1".into(),
        "≥ 1.5×".into(),
        ratio
            .map(|x| {
                let capped = mosq.is_some_and(|m| m.capped) || tern.is_some_and(|t| t.capped);
                format!(
                    "{x:.2}×{}",
                    if capped { " (a search hit its ceiling: bound, not ratio)" } else { "" }
                )
            })
            .unwrap_or_else(|| "–".into()),
        status(ratio.map(|x| x >= 1.5)),
    ]);
    // The target sets no latency: the best run that delivered everything
    // counts (a ceiling run, usually), with its p99, and the rate within
    // the latency objective is shown beside it.
    let fan =
        r.s4.iter()
            .filter(|x| {
                x.system == "tern" && x.target == "standalone-plain" && x.group_size == 1000 && x.verdict.ok
            })
            .max_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
    rows.push([
        "fan-out, group of 1000".into(),
        "≥ 1,000,000 deliveries/s".into(),
        fan.map(|x| {
            let within = r
                .s4_max
                .iter()
                .find(|m| m.system == "tern" && m.target == "standalone-plain" && m.group_size == 1000)
                .map_or_else(|| "–".into(), |m| rate(m.max_deliveries_per_s));
            format!(
                "{} deliveries/s, all delivered, p99 {} ms (offered {}/s; {within}/s within the p99 objective)",
                rate(x.deliveries_per_s),
                fmt_ms(x.latency.p99_ms),
                rate(x.offered_rate * f64::from(x.group_size.saturating_sub(1))),
            )
        })
        .unwrap_or_else(|| "–".into()),
        status(fan.map(|x| x.deliveries_per_s >= 1e6)),
    ]);
    let storm = r.s2.iter().find(|s| s.target == "standalone-tls");
    rows.push([
        "connect storm (TLS)".into(),
        "≥ 5,000 logins/s, 0 errors".into(),
        storm
            .map(|s| {
                format!(
                    "{} logins/s, {} errors ({} conns)",
                    rate(s.ramp.logins_per_s),
                    s.ramp.errors,
                    s.ramp.connections
                )
            })
            .unwrap_or_else(|| "–".into()),
        status(storm.map(|s| s.ramp.errors == 0 && s.ramp.logins_per_s >= 5000.0)),
    ]);
    // One id per call (0: results older than the field): runs of ids per
    // call are shown in the S5 table, not counted for the target.
    let ids =
        r.s5.iter()
            .filter(|x| x.place == "in-process" && x.ids_per_call <= 1)
            .max_by(|a, b| a.ids_per_s.total_cmp(&b.ids_per_s));
    rows.push([
        "ids in-process".into(),
        "≥ 10,000,000 ids/s".into(),
        ids.map(|x| format!("{} ids/s ({})", rate(x.ids_per_s), x.name)).unwrap_or_else(|| "–".into()),
        status(ids.map(|x| x.ids_per_s >= 1e7)),
    ]);
    rows
}

fn table(out: &mut String, header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push('\n');
}

fn rate_rows(runs: &[RateRun]) -> Vec<Vec<String>> {
    runs.iter()
        .map(|x| {
            vec![
                x.system.clone(),
                x.target.clone(),
                if x.group_size > 0 {
                    format!("{} × {}", x.streams, x.group_size)
                } else {
                    format!("{} pairs", x.streams)
                },
                x.label.clone(),
                rate(x.offered_rate),
                rate(x.deliveries_per_s),
                format!(
                    "{}/{}/{} dup {} miss {}{}",
                    x.verdict.sent,
                    x.verdict.acked,
                    x.verdict.received,
                    x.verdict.duplicates,
                    x.verdict.missing,
                    if x.verdict.ok { " ✓" } else { " ✗" }
                ),
                x.ack_latency
                    .as_ref()
                    .map(|a| format!("{} / {}", fmt_ms(a.p50_ms), fmt_ms(a.p99_ms)))
                    .unwrap_or_else(|| "no ACKs".into()),
                x.latency.line(),
                x.last_member_latency.as_ref().map(|l| l.line()).unwrap_or_default(),
                cpu_cell(&x.cpu, x.machine_cpu.as_ref()),
            ]
        })
        .collect()
}

/// `BENCHMARKS.md` from the results.
pub fn markdown(r: &Results, plots: &[String]) -> String {
    let mut out = String::new();
    out.push_str("# tern benchmarks\n\n");
    if r.profile == "smoke" {
        out.push_str(
            "> **Smoke run.** These figures come from the `smoke` profile: tiny sizes and runs of a few seconds, \
             meant to prove that the machinery works, not to measure tern. They are honest measurements of those \
             small runs and say nothing about the targets; the full run is `./scripts/bench.sh` (profile `full`).\n\n",
        );
    }
    let _ = writeln!(
        out,
        "Generated by `tern-bench` ({}), profile `{}`. The load generator runs on the same machine and shares its \
         cores with the servers: CPU per process is listed with every run (100% = one core busy).\n",
        r.schema, r.profile
    );
    out.push_str("## Targets\n\n");
    table(&mut out, &["target", "goal", "reached", "status"], targets(r).into_iter().map(|row| row.to_vec()));
    if r.profile == "smoke" {
        out.push_str(
            "(In a smoke run the sizes are far below the targets' own, so \"not met\" here is expected.)\n\n",
        );
    }

    if !r.notes.is_empty() {
        out.push_str("## Notes\n\n");
        for note in &r.notes {
            let _ = writeln!(out, "{note}\n");
        }
    }

    out.push_str("## Machine and versions\n\n");
    let m = &r.machine;
    table(
        &mut out,
        &["item", "value"],
        [
            vec!["CPU".into(), format!("{} ({} cores)", m.cpu_model, m.cores)],
            vec!["memory".into(), format!("{:.1} GiB", m.mem_total_kib as f64 / 1048576.0)],
            vec!["kernel".into(), m.kernel.clone()],
            vec!["open files (soft / hard)".into(), m.open_files_limit.clone()],
        ]
        .into_iter()
        .chain(r.versions.iter().map(|(k, v)| vec![k.clone(), v.clone()])),
    );
    out.push_str("Command lines:\n\n```text\n");
    for c in &r.command_lines {
        let _ = writeln!(out, "{c}");
    }
    out.push_str("```\n\nSettings:\n\n");
    table(&mut out, &["setting", "value"], r.settings.iter().map(|(k, v)| vec![k.clone(), v.clone()]));

    out.push_str("## Method\n\n");
    out.push_str(
        "- **Open loop, constant rate.** Message *g* is due at start + *g*/rate and is sent then, or as soon as \
         possible after if the generator is late; nothing is skipped. The due time travels in the message \
         (monotonic clock of the generator, which also receives), and latency = receive time − due time (read \
         once per burst of frames taken from a connection), so a stall shows in the percentiles (no \
         coordinated omission). HdrHistogram, 3 significant digits.\n\
         - **Delivery verified in every run**: each receiver keeps a bit per message; a run reports sent, \
         server-ACKed, received, duplicates and missing, and counts only if sent = ACKed = received / fan-out \
         with no duplicate.\n\
         - **tern**: `SEND_SINGLE`/`SEND_GROUP` with the server's SendAck (message durable), pushes ACKed by the \
         receiver with `ACK_MESSAGES` (batched per read burst). **Mosquitto**: MQTT 3.1.1 QoS 1 (PUBACK from the \
         broker, PUBACK from the subscriber), no persistence, no queue limits. **NATS**: core publish/subscribe, \
         which has no ACKs at all (at most once), so it is a ceiling rather than a like-for-like peer.\n\
         - **Sustainable** = verdict OK, everything delivered within the drain timeout and p99 ≤ the latency \
         objective. The search doubles the rate until a run is not sustainable, then bisects.\n\
         - **Ceiling** (runs labelled `ceiling`, groups of 1000): the fan-out target sets a rate and no \
         latency, so past the search, from the target rate up, each run offers 25% more until one loses a \
         delivery, does not drain, or counts under 95% of what it was offered (the server fell behind, and \
         counted to the last delivery, its rate is then what it can deliver). The best verified run counts \
         for the target, with its p99.\n\
         - **CPU**: per process, 100% = one core busy over the run; *machine* is how busy all the cores were \
         over the same window (`/proc/stat`), whatever ran: it also counts interrupt work on otherwise idle \
         cores and anything outside the measured processes; *irq* is its share in interrupts (on loopback, much \
         of the TCP processing).\n\
         - **S1 memory** = (RSS of the access-node process with N idle connections − RSS before the first \
         connection) / N; `anon` is the same for `RssAnon` (heap). Kernel socket buffers are not in RSS.\n\n",
    );

    if !r.s1.is_empty() {
        out.push_str("## S1 — idle connections\n\n");
        table(
            &mut out,
            &[
                "target",
                "connections",
                "ok / errors",
                "RSS before → with (KiB)",
                "RSS per conn",
                "anon per conn",
                "after close (KiB)",
                "login latency ms p50/p90/p99/p99.9/max",
            ],
            r.s1.iter().map(|p| {
                vec![
                    p.target.clone(),
                    p.connections.to_string(),
                    format!("{} / {}", p.ok, p.errors),
                    format!("{} → {}", p.base_rss_kib, p.rss_kib),
                    format!("{:.2} KiB", p.rss_per_conn_bytes / 1024.0),
                    format!("{:.2} KiB", p.anon_per_conn_bytes / 1024.0),
                    p.rss_after_close_kib.to_string(),
                    p.login_latency.line(),
                ]
            }),
        );
    }
    if !r.s2.is_empty() {
        out.push_str("## S2 — connect storm\n\nEach login: TCP connect, TLS handshake (TLS targets), LOGIN with a token (token check, session placement).\n\n");
        table(
            &mut out,
            &[
                "target",
                "connections",
                "offered/s",
                "ok",
                "errors",
                "seconds",
                "logins/s",
                "latency ms p50/p90/p99/p99.9/max",
                "workers × sources",
                "CPU",
            ],
            r.s2.iter().map(|s| {
                vec![
                    s.target.clone(),
                    s.ramp.connections.to_string(),
                    rate(s.ramp.offered_rate),
                    s.ramp.ok.to_string(),
                    s.ramp.errors.to_string(),
                    format!("{:.2}", s.ramp.elapsed_s),
                    rate(s.ramp.logins_per_s),
                    s.ramp.latency.line(),
                    format!("{} × {}", s.ramp.workers, s.ramp.sources),
                    cpu_cell(&s.ramp.cpu, s.ramp.machine_cpu.as_ref()),
                ]
            }),
        );
    }
    let header = [
        "system",
        "target",
        "shape",
        "run",
        "offered msgs/s",
        "deliveries/s",
        "sent/acked/received",
        "ACK ms p50 / p99",
        "e2e ms p50/p90/p99/p99.9/max",
        "last member ms",
        "CPU",
    ];
    for (title, maxes, runs) in [("S3 — 1:1", &r.s3_max, &r.s3), ("S4 — group fan-out", &r.s4_max, &r.s4)]
    {
        if runs.is_empty() {
            continue;
        }
        let _ = writeln!(out, "## {title}\n");
        if !maxes.is_empty() {
            let tern_of = |m: &MaxRate| {
                maxes
                    .iter()
                    .find(|t| {
                        t.system == "tern" && t.target == "standalone-plain" && t.group_size == m.group_size
                    })
                    .map(|t| t.max_deliveries_per_s)
            };
            table(
                &mut out,
                &[
                    "system",
                    "target",
                    "group",
                    "highest sustainable msgs/s",
                    "deliveries/s",
                    "tern-plain ÷ this",
                    "rates tried",
                ],
                maxes.iter().map(|m| {
                    vec![
                        m.system.clone(),
                        m.target.clone(),
                        if m.group_size > 0 { m.group_size.to_string() } else { "1:1".into() },
                        format!("{}{}", rate(m.max_rate), if m.capped { " (ceiling)" } else { "" }),
                        rate(m.max_deliveries_per_s),
                        tern_of(m)
                            .filter(|_| m.max_deliveries_per_s > 0.0)
                            .map(|t| format!("{:.2}×", t / m.max_deliveries_per_s))
                            .unwrap_or_else(|| "–".into()),
                        m.tried.iter().map(|x| rate(*x)).collect::<Vec<_>>().join(", "),
                    ]
                }),
            );
        }
        table(&mut out, &header, rate_rows(runs));
    }
    if !r.s5.is_empty() {
        out.push_str("## S5 — id generation\n\n");
        table(
            &mut out,
            &["test", "where", "ids/s", "ids", "seconds", "unique"],
            r.s5.iter().map(|x| {
                vec![
                    x.name.clone(),
                    x.place.clone(),
                    rate(x.ids_per_s),
                    x.ids.to_string(),
                    format!("{:.2}", x.seconds),
                    if x.verified { "yes".into() } else { "NO".into() },
                ]
            }),
        );
        out.push_str("One snowflake worker issues at most 4096 ids per millisecond (12-bit sequence), 4.1 M ids/s, by design. \
            The segment allocator takes one compare-and-swap per call (`next_id`: one id, `next_range(n)`: up to n); \
            it is bounded by the counter store (one durable increment per segment) with step 1000, \
            and with `next_range` even with step 1000000, hence the runs with a larger step. \
            The target row counts one-id-per-call figures only.\n\n");
    }
    if !plots.is_empty() {
        out.push_str("## Plots\n\n");
        for p in plots {
            let _ = writeln!(out, "![{p}](bench-results/{p})\n");
        }
    }
    if !r.skipped.is_empty() {
        out.push_str("## Not run\n\n");
        for s in &r.skipped {
            let _ = writeln!(out, "- {s}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Summary;
    use crate::verify::Verdict;

    fn sample() -> Results {
        let mut r = Results::new("smoke");
        r.s3.push(RateRun {
            scenario: "s3".into(),
            system: "tern".into(),
            target: "standalone-plain".into(),
            label: "at 70%".into(),
            offered_rate: 1400.0,
            verdict: Verdict::check(10, Some(10), 0, 1, 10, 0, 0, 0),
            latency: Summary { count: 10, p99_ms: 3.0, ..Summary::default() },
            ..RateRun::default()
        });
        r.s3_max.push(MaxRate {
            scenario: "s3".into(),
            system: "tern".into(),
            target: "standalone-plain".into(),
            max_rate: 2000.0,
            max_deliveries_per_s: 2000.0,
            ..MaxRate::default()
        });
        r.s3_max.push(MaxRate {
            scenario: "s3".into(),
            system: "mosquitto".into(),
            target: "mosquitto".into(),
            max_rate: 1000.0,
            max_deliveries_per_s: 1000.0,
            ..MaxRate::default()
        });
        r
    }

    #[test]
    fn json_shape() {
        let v = serde_json::to_value(sample()).unwrap();
        for key in [
            "schema",
            "profile",
            "machine",
            "versions",
            "command_lines",
            "settings",
            "s1",
            "s2",
            "s3",
            "s3_max",
            "s4",
            "s4_max",
            "s5",
            "skipped",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["schema"], SCHEMA);
        let run = &v["s3"][0];
        for key in [
            "system",
            "target",
            "label",
            "offered_rate",
            "deliveries_per_s",
            "verdict",
            "latency",
            "ack_latency",
            "cpu",
        ] {
            assert!(run.get(key).is_some(), "run lacks {key}");
        }
        for key in ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(run["latency"].get(key).is_some(), "latency lacks {key}");
        }
        for key in ["sent", "acked", "received", "duplicates", "missing", "ok"] {
            assert!(run["verdict"].get(key).is_some(), "verdict lacks {key}");
        }
        // And it reads back.
        let back: Results = serde_json::from_value(v).unwrap();
        assert_eq!(back.s3.len(), 1);
    }

    #[test]
    fn markdown_has_targets_ratio_and_smoke_banner() {
        let md = markdown(&sample(), &["fanout.png".into()]);
        assert!(md.contains("Smoke run"));
        assert!(md.contains("| 1:1 vs Mosquitto QoS 1 | ≥ 1.5× | 2.00× | met |"), "{md}");
        assert!(md.contains("3.00 ms at 1400 msgs/s"));
        assert!(md.contains("![fanout.png](bench-results/fanout.png)"));
        assert!(!md.contains("## Notes"));
    }

    #[test]
    fn the_fan_out_target_counts_the_best_verified_run_with_its_p99() {
        let mut r = sample();
        let run = |label: &str, offered: f64, delivered: f64, ok: bool| RateRun {
            scenario: "s4".into(),
            system: "tern".into(),
            target: "standalone-plain".into(),
            label: label.into(),
            group_size: 1000,
            offered_rate: offered,
            deliveries_per_s: delivered,
            verdict: Verdict { ok, ..Verdict::default() },
            latency: Summary { p99_ms: offered / 10.0, ..Summary::default() },
            ..RateRun::default()
        };
        r.s4.push(run("search", 250.0, 249_000.0, true));
        r.s4.push(run("ceiling", 1250.0, 1_240_000.0, true));
        r.s4.push(run("ceiling", 1560.0, 1_300_000.0, false));
        r.s4_max.push(MaxRate {
            scenario: "s4".into(),
            system: "tern".into(),
            target: "standalone-plain".into(),
            group_size: 1000,
            max_deliveries_per_s: 250_000.0,
            ..MaxRate::default()
        });
        let md = markdown(&r, &[]);
        let row = "| fan-out, group of 1000 | ≥ 1,000,000 deliveries/s | 1.24 M deliveries/s, all delivered, \
                   p99 125 ms (offered 1.25 M/s; 250.0 k/s within the p99 objective) | met |";
        assert!(md.contains(row), "{md}");
        r.s4.retain(|x| x.label == "search");
        assert!(markdown(&r, &[]).contains("| 249.0 k deliveries/s, all delivered, p99 25.00 ms"));
    }

    #[test]
    fn notes_go_under_the_targets_and_old_files_have_none() {
        let mut r = sample();
        r.notes = vec!["First note.".into(), "Second note.".into()];
        let md = markdown(&r, &[]);
        let (targets, notes, machine) =
            (md.find("## Targets").unwrap(), md.find("## Notes").unwrap(), md.find("## Machine").unwrap());
        assert!(targets < notes && notes < machine);
        assert!(md.contains("## Notes\n\nFirst note.\n\nSecond note.\n\n"), "{md}");
        let mut json = serde_json::to_value(sample()).unwrap();
        json.as_object_mut().unwrap().remove("notes");
        let old: Results = serde_json::from_value(json).unwrap();
        assert!(old.notes.is_empty());
    }
}
