//! Cluster harness: every role of tern as its own process (the real
//! binary), on the real engines that `scripts/engines.sh start` runs and
//! names in TERN_REDIS_URL, TERN_ZK_ADDR and TERN_KAFKA_BROKERS. Each
//! cluster gets its own namespace (Redis key prefix, ZooKeeper root, Kafka
//! topic prefix), so clusters of parallel tests never see each other.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use super::Deployment;

/// The engines to run against; `None` (test skipped) when they are not
/// configured and the run does not require them (see `engine_from_env`).
pub fn engines() -> Option<(String, String, String)> {
    let redis = tern_store::conformance::engine_from_env("TERN_REDIS_URL")?;
    let zk = tern_store::conformance::engine_from_env("TERN_ZK_ADDR")?;
    let kafka = tern_store::conformance::engine_from_env("TERN_KAFKA_BROKERS")?;
    Some((redis, zk, kafka))
}

struct Proc {
    child: Child,
    subcommand: &'static str,
    args: Vec<String>,
    /// Fields of the ready line (`listen`, `http`, `internal`, `ca`).
    ready: HashMap<String, String>,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    pub namespace: String,
    pub redis_url: String,
    pub zk_addr: String,
    procs: HashMap<String, Proc>,
}

impl Cluster {
    /// Starts router-auth, idgen, `dispatchers` dispatchers, group-svc,
    /// offline-svc and `access` access nodes named `access-1`, `access-2`, …
    /// Returns `None` when the engines are not configured (test skipped).
    pub fn start(access: usize, dispatchers: usize) -> Option<Cluster> {
        Self::start_with_config(access, dispatchers, "")
    }

    /// [`Cluster::start`] with `extra` appended to the shared config file
    /// (whole sections other than `[engines]` and `[router_auth]`).
    pub fn start_with_config(access: usize, dispatchers: usize, extra: &str) -> Option<Cluster> {
        let (redis_url, zk_addr, kafka) = engines()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let namespace = tern_store::conformance::unique_id("t").replace('-', "_");
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + namespace.len()) as u8)).collect();
        let config = format!(
            "data_dir = \"{data}\"\nshutdown_grace_secs = 5\n\n[engines]\nredis_url = \"{redis_url}\"\nredis_prefix = \"{namespace}\"\nzookeeper = \"{zk_addr}\"\nzookeeper_root = \"{namespace}\"\nzookeeper_session_timeout_ms = 3000\nkafka_brokers = \"{kafka}\"\nkafka_prefix = \"{namespace}\"\nkafka_session_timeout_ms = 6000\n\n[router_auth]\ntoken_secret = \"{secret}\"\n\n{extra}",
            data = dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("cluster.toml"), config).expect("write config");
        let mut cluster = Cluster { dir, namespace, redis_url, zk_addr, procs: HashMap::new() };
        cluster.spawn("router-auth", "router-auth", &["--http-listen", "127.0.0.1:0"]);
        for i in 1..=dispatchers {
            cluster.spawn(&format!("dispatcher-{i}"), "dispatcher", &[]);
        }
        cluster.spawn("idgen", "idgen", &[]);
        cluster.spawn("group-svc", "group-svc", &[]);
        cluster.spawn("offline-svc", "offline-svc", &[]);
        for i in 1..=access {
            cluster.spawn(&format!("access-{i}"), "access-tcp", &[]);
        }
        let names: Vec<String> = cluster.procs.keys().cloned().collect();
        for name in names {
            cluster.wait_ready(&name);
        }
        Some(cluster)
    }

    fn spawn(&mut self, name: &str, subcommand: &'static str, extra: &[&str]) {
        let args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let child = self.launch(name, subcommand, &args);
        self.procs.insert(name.to_owned(), Proc { child, subcommand, args, ready: HashMap::new() });
    }

    fn launch(&self, name: &str, subcommand: &str, args: &[String]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file");
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .arg(subcommand)
            .arg("--config")
            .arg(self.dir.path().join("cluster.toml"))
            .args(["--node-id", name, "--listen", "127.0.0.1:0"])
            .args(args)
            // The engines come from the config file only.
            .env_remove("TERN_REDIS_URL")
            .env_remove("TERN_ZK_ADDR")
            .env_remove("TERN_KAFKA_BROKERS")
            .env("TERN_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tern role")
    }

    fn wait_ready(&mut self, name: &str) {
        let log_path = self.dir.path().join(format!("{name}.log"));
        let proc = self.procs.get_mut(name).expect("known process");
        let stdout = proc.child.stdout.take().expect("stdout");
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("{name} did not report ready; log:\n{log}");
            };
            if let Some((_, rest)) = line.split_once(" ready: ") {
                proc.ready = rest
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                return;
            }
        }
    }

    fn field(&self, name: &str, key: &str) -> String {
        self.procs[name].ready.get(key).cloned().unwrap_or_else(|| panic!("{name} has no {key}"))
    }

    /// Main (gRPC) address of a role process.
    pub fn listen_addr(&self, name: &str) -> String {
        self.field(name, "listen")
    }

    /// Client address of an access node.
    pub fn access_addr(&self, name: &str) -> String {
        self.field(name, "listen")
    }

    pub fn auth_url(&self) -> String {
        self.field("router-auth", "http")
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("data/tls/ca.pem")
    }

    /// What clients need, with no fixed access node (ipList decides).
    pub fn deployment(&self) -> Deployment {
        Deployment { auth_url: self.auth_url(), ca: self.ca(), access: None }
    }

    /// Clients pinned to one access node.
    pub fn deployment_on(&self, access: &str) -> Deployment {
        Deployment { auth_url: self.auth_url(), ca: self.ca(), access: Some(self.access_addr(access)) }
    }

    /// SIGKILL a role process.
    pub fn kill(&mut self, name: &str) {
        let proc = self.procs.get_mut(name).expect("known process");
        let _ = proc.child.kill();
        let _ = proc.child.wait();
    }

    /// SIGTERM, waiting for the exit.
    pub fn terminate(&mut self, name: &str) {
        let proc = self.procs.get_mut(name).expect("known process");
        let _ = Command::new("kill").args(["-TERM", &proc.child.id().to_string()]).status();
        let _ = proc.child.wait();
    }

    /// Starts a killed role again with the same arguments (new ports).
    pub fn restart(&mut self, name: &str) {
        let (subcommand, args) = {
            let p = &self.procs[name];
            (p.subcommand, p.args.clone())
        };
        let child = self.launch(name, subcommand, &args);
        let proc = self.procs.get_mut(name).expect("known process");
        proc.child = child;
        self.wait_ready(name);
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A registry client on this cluster's namespace, to look inside ZooKeeper.
    pub async fn registry(&self) -> tern_store::zookeeper::ZkRegistry {
        tern_store::zookeeper::ZkRegistry::connect(&self.zk_addr, &self.namespace, Duration::from_secs(5))
            .await
            .expect("connect to ZooKeeper")
    }

    /// This cluster's Redis stores, to look inside.
    pub async fn redis(&self) -> tern_store::redis::RedisBackends {
        tern_store::redis::RedisBackends::connect(&self.redis_url, &self.namespace)
            .await
            .expect("connect to Redis")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for proc in self.procs.values_mut() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}
