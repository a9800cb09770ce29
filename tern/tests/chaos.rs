//! Short runs of `tern chaos` (the tool users run, the real binary): random
//! SIGKILLs under traffic, then every acknowledged message must have been
//! shown on every device it is owed to, once, in order. The long runs
//! behind the figures in docs/DELIVERY.md use the same command with a
//! longer `--duration-secs`.

use std::process::Command;

/// Runs `tern chaos` with `args`, returns its report (stdout) after
/// checking it passed.
fn chaos(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("chaos")
        .args(args)
        .env("TERN_LOG", "warn")
        .output()
        .expect("run tern chaos");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tern chaos failed ({}):\n{report}\n{progress}", output.status);
    assert!(report.contains("result: PASS"), "{report}");
    report
}

/// The number after `label` in the report, e.g. `acknowledged 123`.
fn figure(report: &str, label: &str) -> u64 {
    let at = report.find(label).unwrap_or_else(|| panic!("no {label:?} in:\n{report}"));
    report[at + label.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in:\n{report}"))
}

fn check_contract_held(report: &str) {
    for label in ["lost", "duplicated", "out of order", "corrupted", "given up"] {
        assert_eq!(figure(report, &format!("{label} ")), 0, "{label}:\n{report}");
    }
    assert!(figure(report, "acknowledged ") >= 500, "too little traffic to mean anything:\n{report}");
    assert!(figure(report, "delivered ") >= figure(report, "acknowledged "), "{report}");
}

#[test]
fn standalone_restarts_lose_nothing() {
    let report = chaos(&[
        "standalone",
        "--users",
        "9",
        "--rate",
        "80",
        "--duration-secs",
        "20",
        "--kill-every-secs",
        "5",
        "--max-down-secs",
        "1",
        "--seed",
        "11",
    ]);
    check_contract_held(&report);
    assert!(figure(&report, "kills: ") >= 2, "{report}");
}

/// A deployment that cannot start fails the run with an error naming the
/// process log, and that log is kept to be read (the temporary work
/// directory used to go with the error).
#[test]
fn a_deployment_that_fails_to_start_keeps_the_log_its_error_names() {
    // `false` exits at once, before anything is ready.
    let output = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["chaos", "standalone", "--tern-bin", "false", "--duration-secs", "5"])
        .env("TERN_LOG", "warn")
        .output()
        .expect("run tern chaos");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let named = stderr
        .split_whitespace()
        .find(|word| word.contains("tern-chaos-") && word.ends_with(".log"))
        .unwrap_or_else(|| panic!("no log named in:\n{stderr}"));
    let log = std::path::Path::new(named);
    assert!(log.exists(), "{} is gone:\n{stderr}", log.display());
    std::fs::remove_dir_all(log.parent().expect("the work directory")).unwrap();
}

#[test]
fn cluster_kills_of_every_role_lose_nothing() {
    let Some(redis) = tern_store::conformance::engine_from_env("TERN_REDIS_URL") else { return };
    let Some(zk) = tern_store::conformance::engine_from_env("TERN_ZK_ADDR") else { return };
    let Some(kafka) = tern_store::conformance::engine_from_env("TERN_KAFKA_BROKERS") else { return };
    let report = chaos(&[
        "cluster",
        "--redis-url",
        &redis,
        "--zookeeper",
        &zk,
        "--kafka-brokers",
        &kafka,
        "--users",
        "9",
        "--rate",
        "60",
        "--duration-secs",
        "35",
        "--kill-every-secs",
        "2.5",
        "--max-down-secs",
        "1",
        "--seed",
        "12",
    ]);
    check_contract_held(&report);
    // One shuffled round kills every process once.
    let per_process =
        report.lines().find(|l| l.trim_start().starts_with("per process:")).expect("per-process line");
    for role in [
        "access-1",
        "access-2",
        "dispatcher-1",
        "dispatcher-2",
        "router-auth",
        "offline-svc",
        "group-svc",
        "idgen",
    ] {
        assert!(per_process.contains(&format!("{role} ×")), "{role} never killed:\n{report}");
    }
}
