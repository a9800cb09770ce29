//! The processes under test: `tern standalone`, or every cluster role as its
//! own process on the real engines. The chaos tool owns them so it can
//! SIGKILL one and start it again.
//!
//! A restarted process keeps its data directory and, where clients or
//! peers need a fixed address (router-auth's HTTP API, the standalone
//! ports), its port. Everything else gets a fresh port and, in a cluster, a
//! fresh node id per incarnation: a node id names a ZooKeeper registration
//! and a set of session placements, and the dead incarnation's must be
//! cleaned up as a departed node's, not confused with the new one's.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The engines a cluster runs on.
#[derive(Debug, Clone)]
pub struct Engines {
    pub redis_url: String,
    pub zookeeper: String,
    pub kafka_brokers: String,
}

struct Process {
    name: String,
    subcommand: &'static str,
    /// Arguments kept across restarts.
    args: Vec<String>,
    /// Cluster roles get `--node-id <name>-<incarnation>`.
    node_ids: bool,
    incarnation: u32,
    child: Option<Child>,
}

/// A running deployment: its processes and how clients reach it.
pub struct Deployment {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    processes: Vec<Process>,
    pub auth_url: String,
    pub ca: PathBuf,
}

/// A loopback port nobody listens on right now. The listener is closed
/// before the port is used; on loopback nobody else races for it in
/// practice, and listeners set SO_REUSEADDR, so a restart on the same port
/// is not blocked by connections in TIME_WAIT.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Deployment {
    /// `tern standalone` on `dir`, on fixed ports so clients find it again
    /// after a restart.
    pub async fn standalone(bin: &Path, dir: &Path) -> anyhow::Result<Deployment> {
        let access = format!("127.0.0.1:{}", free_port()?);
        let http = free_port()?;
        let config = dir.join("standalone.toml");
        std::fs::write(&config, format!("data_dir = \"{}\"\n", dir.join("data").display()))?;
        let mut deployment = Deployment::new(bin, dir, config, http);
        deployment.add(
            "standalone",
            "standalone",
            vec!["--access-listen".into(), access, "--http-listen".into(), format!("127.0.0.1:{http}")],
            false,
        );
        deployment.start_all().await?;
        Ok(deployment)
    }

    /// Every role as its own process: router-auth, idgen, two dispatchers,
    /// group-svc, offline-svc and two access nodes, in a namespace of their
    /// own on the engines (Redis key prefix, ZooKeeper root, Kafka topic
    /// prefix), so a run never sees another's data.
    pub async fn cluster(bin: &Path, dir: &Path, engines: &Engines) -> anyhow::Result<Deployment> {
        let namespace = format!("chaos_{:08x}", rand::random::<u32>());
        let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        let config = dir.join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{data}\"\nshutdown_grace_secs = 5\n\n[engines]\nredis_url = \"{redis}\"\nredis_prefix = \"{namespace}\"\nzookeeper = \"{zk}\"\nzookeeper_root = \"{namespace}\"\nzookeeper_session_timeout_ms = 3000\nkafka_brokers = \"{kafka}\"\nkafka_prefix = \"{namespace}\"\nkafka_session_timeout_ms = 6000\n\n[router_auth]\ntoken_secret = \"{secret}\"\n",
                data = dir.join("data").display(),
                redis = engines.redis_url,
                zk = engines.zookeeper,
                kafka = engines.kafka_brokers,
            ),
        )?;
        let http = free_port()?;
        let mut deployment = Deployment::new(bin, dir, config, http);
        deployment.add(
            "router-auth",
            "router-auth",
            vec!["--http-listen".into(), format!("127.0.0.1:{http}")],
            true,
        );
        deployment.add("idgen", "idgen", vec![], true);
        deployment.add("dispatcher-1", "dispatcher", vec![], true);
        deployment.add("dispatcher-2", "dispatcher", vec![], true);
        deployment.add("group-svc", "group-svc", vec![], true);
        deployment.add("offline-svc", "offline-svc", vec![], true);
        deployment.add("access-1", "access-tcp", vec![], true);
        deployment.add("access-2", "access-tcp", vec![], true);
        deployment.start_all().await?;
        Ok(deployment)
    }

    /// An empty deployment whose router-auth HTTP API will listen on
    /// `http_port`; the processes share `config` and `dir`'s data.
    fn new(bin: &Path, dir: &Path, config: PathBuf, http_port: u16) -> Deployment {
        Deployment {
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            config,
            processes: Vec::new(),
            auth_url: format!("http://127.0.0.1:{http_port}"),
            ca: dir.join("data/tls/ca.pem"),
        }
    }

    fn add(&mut self, name: &str, subcommand: &'static str, args: Vec<String>, node_ids: bool) {
        self.processes.push(Process {
            name: name.to_owned(),
            subcommand,
            args,
            node_ids,
            incarnation: 0,
            child: None,
        });
    }

    async fn start_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.processes.len() {
            self.start(i).await?;
        }
        Ok(())
    }

    /// The names of the processes, the candidates for a kill.
    pub fn names(&self) -> Vec<String> {
        self.processes.iter().map(|p| p.name.clone()).collect()
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.processes.iter().position(|p| p.name == name).with_context(|| format!("no process named {name}"))
    }

    /// Where a process writes its log (every incarnation appends).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Starts a process and waits for its ready line.
    async fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let log_path = self.log_path(&self.processes[index].name);
        let process = &mut self.processes[index];
        process.incarnation += 1;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut command = Command::new(&self.bin);
        command.arg(process.subcommand).arg("--config").arg(&self.config);
        if process.node_ids {
            command.args(["--node-id", &format!("{}-{}", process.name, process.incarnation)]);
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .args(&process.args)
            // The engines come from the config file only.
            .env_remove("TERN_REDIS_URL")
            .env_remove("TERN_ZK_ADDR")
            .env_remove("TERN_KAFKA_BROKERS")
            .env_remove("TERN_CONFIG")
            .env("TERN_LOG", std::env::var("TERN_CHAOS_SERVER_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(" ready: ") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) | Ok(Err(_)) => {
                bail!("{} exited before it was ready; see {}", process.name, log_path.display())
            }
            Err(_) => bail!("{} not ready within 60 s; see {}", process.name, log_path.display()),
        }
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        process.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no drain, no deregistration, nothing flushed.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        if let Some(mut child) = self.processes[index].child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM: the process drains (an access node tells its clients to
    /// reconnect elsewhere) and exits; SIGKILL if it is still there after
    /// `grace`. Returns whether it exited by itself.
    pub async fn terminate(&mut self, name: &str, grace: Duration) -> anyhow::Result<bool> {
        let index = self.index(name)?;
        let Some(mut child) = self.processes[index].child.take() else { return Ok(true) };
        if let Some(pid) = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32)) {
            rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => {
                status?;
                Ok(true)
            }
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                Ok(false)
            }
        }
    }

    /// Starts a killed process again (same data, fixed ports kept).
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index(name)?;
        self.start(index).await
    }

    /// Starts again every process that exited on its own (a crash the
    /// tool did not cause); returns them as `name (exit status)`.
    pub async fn restart_exited(&mut self) -> anyhow::Result<Vec<String>> {
        let mut exited = Vec::new();
        for index in 0..self.processes.len() {
            let process = &mut self.processes[index];
            if let Some(child) = &mut process.child
                && let Ok(Some(status)) = child.try_wait()
            {
                exited.push(format!("{} ({status})", process.name));
                process.child = None;
                self.start(index).await?;
            }
        }
        Ok(exited)
    }

    /// SIGKILLs everything (the run is over).
    pub async fn stop(&mut self) {
        for process in &mut self.processes {
            if let Some(mut child) = process.child.take() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}
