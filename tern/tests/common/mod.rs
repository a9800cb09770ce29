//! Test harness: runs `tern standalone` as a user would (the real binary, a
//! fresh data directory, real TLS sockets) and connects SDK clients to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tern_sdk::pb;
use tern_sdk::{AuthClient, Client, ClientConfig, ConnectOptions, Connection, Event, ServerEvent, TlsMode};
use tokio::sync::mpsc;

pub mod cluster;
pub mod suite;

pub const PASSWORD: &str = "correct-horse";

/// What a client needs to reach a deployment, standalone or cluster.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub auth_url: String,
    pub ca: PathBuf,
    /// A fixed access node; `None` lets ipList choose.
    pub access: Option<String>,
}

impl Deployment {
    pub fn client_config(&self, user: &str) -> ClientConfig {
        let mut config = ClientConfig::new(&self.auth_url, user, PASSWORD, TlsMode::CaFile(self.ca.clone()));
        config.register_if_missing = true;
        config.access_addr = self.access.clone();
        config
    }

    /// A logged-in SDK client (the account is created if needed).
    pub async fn client(&self, user: &str) -> (Client, mpsc::Receiver<Event>) {
        Client::connect(self.client_config(user))
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
    }

    /// A logged-in SDK client on a named device of `user`.
    pub async fn client_on(&self, user: &str, device: &str) -> (Client, mpsc::Receiver<Event>) {
        let mut config = self.client_config(user);
        config.device_id = device.to_owned();
        Client::connect(config).await.unwrap_or_else(|e| panic!("{user}/{device} cannot connect: {e}"))
    }

    /// A raw connection to the fixed access node, logged in as `user` on
    /// `device` (the account is created if needed).
    pub async fn raw_on(
        &self,
        user: &str,
        device: &str,
    ) -> (Connection, mpsc::UnboundedReceiver<ServerEvent>) {
        let token =
            AuthClient::new(&self.auth_url).login_or_register(user, PASSWORD).await.expect("login").token;
        let access = self.access.as_deref().expect("raw connections need a fixed access node");
        let options = ConnectOptions::new(access, TlsMode::CaFile(self.ca.clone()));
        let (conn, events) = Connection::connect(&options).await.expect("raw connect");
        let login = pb::LoginRequest { token, device_id: device.into() };
        let _: pb::LoginResponse =
            conn.request(tern_sdk::proto::RequestType::Login, &login).await.expect("login");
        (conn, events)
    }

    /// Makes sure `user` exists without logging in on a connection.
    pub async fn register(&self, user: &str) {
        AuthClient::new(&self.auth_url).login_or_register(user, PASSWORD).await.expect("register");
    }
}

/// A running `tern standalone` process.
pub struct Server {
    child: Child,
    pub data_dir: PathBuf,
    pub access: String,
    pub auth_url: String,
    pub ca: PathBuf,
}

impl Server {
    /// Starts a server on a new temporary data directory.
    pub fn start() -> (Server, tempfile::TempDir) {
        Self::start_with_config("")
    }

    /// Starts a server whose config file holds `toml` (plus the data dir).
    pub fn start_with_config(toml: &str) -> (Server, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Self::start_in(dir.path(), toml);
        (server, dir)
    }

    /// Starts a server on `data_dir` (reusing whatever is there).
    pub fn start_in(data_dir: &Path, toml: &str) -> Server {
        let config_path = data_dir.join("tern-test.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["standalone", "--config"])
            .arg(&config_path)
            .arg("--data-dir")
            .arg(data_dir.join("data"))
            .args(["--access-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .env("TERN_LOG", "info,tern_access_tcp=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tern standalone");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                panic!("server did not report ready; log:\n{log}")
            };
            if let Some(rest) = line.strip_prefix("tern standalone ready: ") {
                let field = |name: &str| {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .unwrap_or_else(|| panic!("ready line lacks {name}: {line}"))
                        .to_owned()
                };
                let ca = PathBuf::from(field("ca"));
                return Server {
                    child,
                    data_dir: data_dir.to_owned(),
                    access: field("access-tcp"),
                    auth_url: field("router-auth"),
                    ca,
                };
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn tls(&self) -> TlsMode {
        TlsMode::CaFile(self.ca.clone())
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([name, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {name} failed");
    }

    /// SIGKILL: no drain, no flush beyond what was already durable.
    pub fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn terminate(mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal("-TERM");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }

    pub fn auth(&self) -> AuthClient {
        AuthClient::new(&self.auth_url)
    }

    /// Registers `user` (if needed) and returns a token.
    pub async fn token(&self, user: &str) -> String {
        self.auth().login_or_register(user, PASSWORD).await.expect("login").token
    }

    pub fn deployment(&self) -> Deployment {
        Deployment { auth_url: self.auth_url.clone(), ca: self.ca.clone(), access: Some(self.access.clone()) }
    }

    pub fn client_config(&self, user: &str) -> ClientConfig {
        self.deployment().client_config(user)
    }

    /// A logged-in SDK client (the account is created if needed).
    pub async fn client(&self, user: &str) -> (Client, mpsc::Receiver<Event>) {
        self.deployment().client(user).await
    }

    /// A raw TLS connection, not logged in.
    pub async fn raw(&self) -> (Connection, mpsc::UnboundedReceiver<ServerEvent>) {
        Connection::connect(&ConnectOptions::new(&self.access, self.tls())).await.expect("raw connect")
    }

    /// A raw TLS connection logged in as `user`.
    pub async fn raw_logged_in(&self, user: &str) -> (Connection, mpsc::UnboundedReceiver<ServerEvent>) {
        let token = self.token(user).await;
        let (conn, events) = self.raw().await;
        let _: pb::LoginResponse = conn
            .request(
                tern_sdk::proto::RequestType::Login,
                &pb::LoginRequest { token, device_id: "raw".into() },
            )
            .await
            .expect("login");
        (conn, events)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next message event, failing the test after `timeout`.
pub async fn next_message(events: &mut mpsc::Receiver<Event>, timeout: Duration) -> pb::Message {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Message(m))) => return m,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("client event stream ended"),
            Err(_) => panic!("no message within {timeout:?}"),
        }
    }
}

/// Asserts that no message arrives within `wait`.
pub async fn no_message(events: &mut mpsc::Receiver<Event>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Message(m))) => panic!("unexpected message {m:?}"),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return,
        }
    }
}

pub fn text(m: &pb::Message) -> String {
    String::from_utf8_lossy(&m.content).into_owned()
}
