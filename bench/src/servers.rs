//! The servers under test: `tern standalone`, Mosquitto and nats-server,
//! each started by the benchmark on loopback with its own data directory
//! and stopped at the end; and the local cluster of `scripts/cluster.sh`,
//! used when it is up.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A server process the benchmark started.
pub struct Server {
    pub name: String,
    pub pid: u32,
    /// How it was started, for the report.
    pub command_line: String,
    child: Child,
    /// Data directory and config, removed when the server is dropped.
    _dir: tempfile::TempDir,
}

impl Server {
    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.stop_in_place(grace);
    }

    fn stop_in_place(&mut self, grace: Duration) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    /// A server is never left behind, even when a scenario fails.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where the benchmark finds one tern deployment.
#[derive(Debug, Clone)]
pub struct Target {
    /// `standalone-plain`, `standalone-tls` or `cluster`.
    pub name: String,
    pub auth_url: String,
    /// Access nodes (`host:port`); connections are spread over them.
    pub access: Vec<String>,
    /// CA to trust; `None` for plaintext.
    pub ca: Option<PathBuf>,
    /// Server processes, for CPU and memory.
    pub procs: Vec<(String, u32)>,
    /// The process holding the client connections (for S1), if one.
    pub access_pid: Option<u32>,
}

impl Target {
    pub fn tls(&self) -> bool {
        self.ca.is_some()
    }
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Starts `tern standalone` on free loopback ports with a fresh data
/// directory and waits for its ready line.
pub fn start_tern(bin: &Path, tls: bool, log_dir: &Path) -> anyhow::Result<(Server, Target)> {
    let dir = tempfile::Builder::new().prefix("tern-bench-").tempdir()?;
    start_tern_in(bin, tls, log_dir, dir)
}

impl Server {
    /// Stops this `tern standalone` and starts it again on the same data
    /// directory (accounts and tokens survive) with fresh memory: S1 takes
    /// its baseline after a restart, because the Argon2 hashing of account
    /// preparation leaves tens of MiB in the allocator for a while.
    pub fn restart_tern(mut self, bin: &Path, tls: bool, log_dir: &Path) -> anyhow::Result<(Server, Target)> {
        let dir = std::mem::replace(&mut self._dir, tempfile::tempdir()?);
        self.stop_in_place(Duration::from_secs(15));
        start_tern_in(bin, tls, log_dir, dir)
    }
}

fn start_tern_in(
    bin: &Path,
    tls: bool,
    log_dir: &Path,
    dir: tempfile::TempDir,
) -> anyhow::Result<(Server, Target)> {
    let name = if tls { "standalone-tls" } else { "standalone-plain" };
    let mut cmd = Command::new(bin);
    cmd.arg("standalone").arg("--data-dir").arg(dir.path().join("data")).args([
        "--access-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    if !tls {
        cmd.arg("--plaintext");
    }
    std::fs::create_dir_all(log_dir)?;
    let log =
        std::fs::OpenOptions::new().create(true).append(true).open(log_dir.join(format!("{name}.log")))?;
    // Warnings only, unless the caller asks for more (TERN_LOG set).
    let filter = std::env::var("TERN_LOG").unwrap_or_else(|_| "warn".into());
    cmd.env("TERN_LOG", filter).stdout(Stdio::piped()).stderr(log).stdin(Stdio::null());
    let command_line = command_line(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    // The ready line is the first line on stdout; read it on a thread so a
    // server that hangs cannot hang us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            bail!("tern standalone printed no ready line (see {}/{name}.log)", log_dir.display());
        }
    };
    let field = |key: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_owned).unwrap_or_default()
    };
    let access = field("access-tcp=");
    let auth_url = field("router-auth=");
    let ca = field("ca=");
    if access.is_empty() || auth_url.is_empty() {
        let _ = child.kill();
        bail!("unexpected ready line: {line}");
    }
    let pid = child.id();
    let target = Target {
        name: name.into(),
        auth_url,
        access: vec![access],
        ca: (tls && !ca.is_empty()).then(|| PathBuf::from(ca)),
        procs: vec![("tern standalone".into(), pid)],
        access_pid: Some(pid),
    };
    let server = Server { name: format!("tern {name}"), pid, command_line, child, _dir: dir };
    Ok((server, target))
}

/// A free loopback port (bound and released; fine on a quiet machine).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_listening(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited at start: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    bail!("{what} is not listening on {port} after 20 s")
}

/// Starts Mosquitto on a free loopback port, configured so that QoS 1
/// messages are never dropped (no queue or in-flight caps) and nothing is
/// persisted, like the tern runs it is compared with.
pub fn start_mosquitto(log_dir: &Path) -> anyhow::Result<(Server, u16)> {
    let dir = tempfile::Builder::new().prefix("tern-bench-mosquitto-").tempdir()?;
    let port = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 0\nmax_inflight_messages 0\nmax_connections -1\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        ),
    )?;
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&conf);
    std::fs::create_dir_all(log_dir)?;
    let log = std::fs::File::create(log_dir.join("mosquitto.log"))?;
    cmd.stdout(Stdio::null()).stderr(log).stdin(Stdio::null());
    let settings: Vec<String> = std::fs::read_to_string(&conf)?.lines().map(str::to_owned).collect();
    let command_line = format!("{}   # mosquitto.conf: {}", command_line(&cmd), settings.join("; "));
    let mut child = cmd.spawn().context("cannot start mosquitto (apt-get install mosquitto)")?;
    wait_listening(port, &mut child, "mosquitto")?;
    let pid = child.id();
    Ok((Server { name: "mosquitto".into(), pid, command_line, child, _dir: dir }, port))
}

/// Starts nats-server on a free loopback port.
pub fn start_nats(log_dir: &Path) -> anyhow::Result<(Server, u16)> {
    let dir = tempfile::Builder::new().prefix("tern-bench-nats-").tempdir()?;
    let port = free_port()?;
    let mut cmd = Command::new("nats-server");
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    std::fs::create_dir_all(log_dir)?;
    let log = std::fs::File::create(log_dir.join("nats-server.log"))?;
    cmd.stdout(Stdio::null()).stderr(log).stdin(Stdio::null());
    let command_line = command_line(&cmd);
    let mut child = cmd.spawn().context("cannot start nats-server (apt-get install nats-server)")?;
    wait_listening(port, &mut child, "nats-server")?;
    let pid = child.id();
    Ok((Server { name: "nats-server".into(), pid, command_line, child, _dir: dir }, port))
}

/// The local cluster of `scripts/cluster.sh up`, if router-auth answers
/// at `auth_url`: its access nodes from ipList and its processes from the
/// pid files in `cluster_dir`.
pub async fn cluster_target(auth_url: &str, cluster_dir: &Path) -> Option<Target> {
    let auth = tern_sdk::AuthClient::new(auth_url);
    let nodes = tokio::time::timeout(Duration::from_secs(2), auth.ip_list()).await.ok()?.ok()?;
    if nodes.is_empty() {
        return None;
    }
    let mut procs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(cluster_dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pid")
                && let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok())
            {
                let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                procs.push((name, pid));
            }
        }
    }
    procs.sort();
    let ca = cluster_dir.join("data/tls/ca.pem");
    Some(Target {
        name: "cluster".into(),
        auth_url: auth_url.to_owned(),
        access: nodes.into_iter().map(|n| n.addr).collect(),
        ca: ca.exists().then_some(ca),
        procs,
        access_pid: None,
    })
}

/// First line of a command's output, for the report's version table.
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_owned()
        }
        Err(_) => "not installed".into(),
    }
}
